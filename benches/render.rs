//! Render of the built-in nginx template for 1,000 services × 5 tasks (target: ≤ 2 ms).
//!
//! `cargo bench --bench render -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use drover::config::Target;
use drover::render::Template;
use drover::state::{Network, Service, Snapshot, Task};

fn snapshot(services: usize, tasks: usize) -> Snapshot {
    let mut snapshot = Snapshot {
        swarm: true,
        networks: vec![Network {
            name: "web".into(),
            driver: "overlay".into(),
            ..Network::default()
        }],
        ..Snapshot::default()
    };
    for i in 0..services {
        let mut labels = BTreeMap::new();
        // Ten services per host, each on its own context, like a busy home lab.
        labels.insert(
            "routing-host".to_owned(),
            format!("app{}.example.com", i / 10),
        );
        labels.insert("routing-context".to_owned(), format!("/svc{i}"));
        labels.insert("routing-port".to_owned(), "8080".to_owned());
        // A host belongs to one stack: the ten services of a host are one stack's.
        labels.insert(
            "com.docker.stack.namespace".to_owned(),
            format!("stack{}", i / 10),
        );
        if i % 3 == 0 {
            labels.insert("routing-auth".to_owned(), "users.htpasswd".to_owned());
            labels.insert("routing-max-body".to_owned(), "10m".to_owned());
        }
        if i % 7 == 0 {
            labels.insert(
                "routing-internal-context".to_owned(),
                format!("/internal{i}"),
            );
        }
        snapshot.services.push(Service {
            id: format!("id{i}"),
            name: format!("service-{i:04}"),
            image: "127.0.0.1:5000/app:latest".into(),
            labels,
            mode: drover::state::ServiceMode::Replicated,
            replicas: Some(tasks as u64),
            networks: vec!["web".into()],
            tasks: (0..tasks)
                .map(|t| Task {
                    slot: Some(t as i64 + 1),
                    node_id: "node".into(),
                    ..Task::running(
                        &format!("task{i}-{t}"),
                        &format!("id{i}"),
                        [(
                            "web".to_owned(),
                            format!("10.{}.{}.{}", i / 250, i % 250, t + 2),
                        )]
                        .into(),
                    )
                })
                .collect(),
            ..Service::default()
        });
    }
    snapshot.sort();
    snapshot
}

fn bench(c: &mut Criterion) {
    let target = Target::new("nginx", "builtin:nginx", "/dev/null");
    let template = Template::load(&target).expect("built-in nginx compiles");
    let snapshot = snapshot(1_000, 5);
    let out = template.render(&snapshot).expect("renders");
    assert!(out.skipped.is_empty());
    c.bench_function("nginx 1000 services x 5 tasks", |b| {
        b.iter(|| template.render(black_box(&snapshot)).expect("renders"))
    });
    // Where the time goes: context building alone, and a few loop shapes.
    for (name, source) in [
        (
            "routes only",
            "{{ target.name }}{% if hosts and upstreams %}{% endif %}",
        ),
        (
            "upstream loop",
            "{% for u in upstreams %}{{ u.name }}{% for s in u.servers %}{{ s }}{% endfor %}{% endfor %}",
        ),
        (
            "location loop",
            "{% for h in hosts %}{% for l in h.locations %}{{ l.path }}{{ l.upstream }}{% if l.auth %}x{% endif %}{% endfor %}{% endfor %}",
        ),
        (
            "services loop",
            "{% for s in services %}{{ s.name }}{% endfor %}",
        ),
    ] {
        let t = Template::compile(name, source, "nginx", None).expect("compiles");
        c.bench_function(name, |b| {
            b.iter(|| t.render(black_box(&snapshot)).expect("renders"))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
