//! Tera filters registered on every template (documented in the `render` module docs).
//!
//! Filters never panic on odd input: a value of the wrong shape is an error that names the
//! filter, which fails that one render.

use std::collections::{BTreeMap, HashMap};

use tera::{Map, Result, Tera, Value};

pub fn register(tera: &mut Tera) {
    tera.register_filter("running", running);
    tera.register_filter("with_state", with_state);
    tera.register_filter("task_ip", task_ip);
    tera.register_filter("with_label", with_label);
    tera.register_filter("label", label);
    tera.register_filter("group_by_label", group_by_label);
}

fn array<'a>(filter: &str, value: &'a Value) -> Result<&'a Vec<Value>> {
    value
        .as_array()
        .ok_or_else(|| tera::Error::msg(format!("filter {filter} expects a list, got {value}")))
}

fn string_arg<'a>(filter: &str, args: &'a HashMap<String, Value>, name: &str) -> Result<&'a str> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(tera::Error::msg(format!(
            "filter {filter}: argument {name} must be a string, got {other}"
        ))),
        None => Err(tera::Error::msg(format!(
            "filter {filter} needs the argument {name}"
        ))),
    }
}

fn field<'a>(item: &'a Value, name: &str) -> Option<&'a str> {
    item.get(name).and_then(Value::as_str)
}

fn label_of<'a>(item: &'a Value, name: &str) -> Option<&'a str> {
    item.get("labels")
        .and_then(|l| l.get(name))
        .and_then(Value::as_str)
}

/// `tasks | running`: tasks whose state and desired state are both `running`.
pub fn running(value: &Value, _: &HashMap<String, Value>) -> Result<Value> {
    let tasks = array("running", value)?;
    Ok(Value::Array(
        tasks
            .iter()
            .filter(|t| {
                field(t, "state") == Some("running") && field(t, "desired_state") == Some("running")
            })
            .cloned()
            .collect(),
    ))
}

/// `tasks | with_state(state="failed")`: tasks in that (current) state.
pub fn with_state(value: &Value, args: &HashMap<String, Value>) -> Result<Value> {
    let tasks = array("with_state", value)?;
    let state = string_arg("with_state", args, "state")?;
    Ok(Value::Array(
        tasks
            .iter()
            .filter(|t| field(t, "state") == Some(state))
            .cloned()
            .collect(),
    ))
}

/// `task | task_ip(network="web")`: the task's address on that network, or an empty string.
/// On a list of tasks: the list of addresses of those tasks that have one.
pub fn task_ip(value: &Value, args: &HashMap<String, Value>) -> Result<Value> {
    let network = string_arg("task_ip", args, "network")?;
    let ip_of = |t: &Value| {
        t.get("ips")
            .and_then(|ips| ips.get(network))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match value {
        Value::Array(tasks) => Ok(Value::Array(
            tasks.iter().filter_map(ip_of).map(Value::String).collect(),
        )),
        Value::Object(_) => Ok(Value::String(ip_of(value).unwrap_or_default())),
        other => Err(tera::Error::msg(format!(
            "filter task_ip expects a task or a list of tasks, got {other}"
        ))),
    }
}

/// `services | with_label(name="routing-host", value="x"?)`: items (services, containers,
/// nodes) carrying the label, with that exact value when `value` is given.
pub fn with_label(value: &Value, args: &HashMap<String, Value>) -> Result<Value> {
    let items = array("with_label", value)?;
    let name = string_arg("with_label", args, "name")?;
    let wanted = match args.get("value") {
        None => None,
        Some(_) => Some(string_arg("with_label", args, "value")?),
    };
    Ok(Value::Array(
        items
            .iter()
            .filter(|i| match (label_of(i, name), wanted) {
                (Some(v), Some(w)) => v == w,
                (Some(_), None) => true,
                (None, _) => false,
            })
            .cloned()
            .collect(),
    ))
}

/// `service | label(name="routing-port", default="80")`: a label's value, the default when
/// it is missing (an empty string without a default).
pub fn label(value: &Value, args: &HashMap<String, Value>) -> Result<Value> {
    let name = string_arg("label", args, "name")?;
    if let Some(v) = label_of(value, name) {
        return Ok(Value::String(v.to_owned()));
    }
    Ok(args
        .get("default")
        .cloned()
        .unwrap_or_else(|| Value::String(String::new())))
}

/// `services | group_by_label(name="prometheus-job")`: a list of `{name, items}` sorted by
/// the label value; items without the label are left out, item order is kept.
pub fn group_by_label(value: &Value, args: &HashMap<String, Value>) -> Result<Value> {
    let items = array("group_by_label", value)?;
    let name = string_arg("group_by_label", args, "name")?;
    let mut groups: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for item in items {
        if let Some(v) = label_of(item, name) {
            groups.entry(v).or_default().push(item.clone());
        }
    }
    Ok(Value::Array(
        groups
            .into_iter()
            .map(|(key, items)| {
                let mut group = Map::new();
                group.insert("name".into(), Value::String(key.to_owned()));
                group.insert("items".into(), Value::Array(items));
                Value::Object(group)
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect()
    }

    fn tasks() -> Value {
        json!([
            {"id": "a", "state": "running", "desired_state": "running", "ips": {"web": "10.0.0.2"}},
            {"id": "b", "state": "starting", "desired_state": "running", "ips": {"web": "10.0.0.3"}},
            {"id": "c", "state": "running", "desired_state": "shutdown", "ips": {}},
            {"id": "d", "state": "failed", "desired_state": "shutdown", "ips": {"other": "10.1.0.9"}}
        ])
    }

    fn ids(v: &Value) -> Vec<&str> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|t| t["id"].as_str().expect("id"))
            .collect()
    }

    #[test]
    fn running_keeps_only_tasks_running_and_meant_to_run() {
        assert_eq!(ids(&running(&tasks(), &args(&[])).expect("ok")), ["a"]);
    }

    #[test]
    fn with_state_filters_on_the_current_state() {
        let out = with_state(&tasks(), &args(&[("state", "running")])).expect("ok");
        assert_eq!(ids(&out), ["a", "c"]);
        assert!(with_state(&tasks(), &args(&[])).is_err());
    }

    #[test]
    fn task_ip_gives_the_address_on_the_named_network() {
        let all = tasks();
        let one = task_ip(&all[0], &args(&[("network", "web")])).expect("ok");
        assert_eq!(one, json!("10.0.0.2"));
        let none = task_ip(&all[2], &args(&[("network", "web")])).expect("ok");
        assert_eq!(none, json!(""));
        let list = task_ip(&all, &args(&[("network", "web")])).expect("ok");
        assert_eq!(list, json!(["10.0.0.2", "10.0.0.3"]));
        assert!(task_ip(&json!(3), &args(&[("network", "web")])).is_err());
    }

    fn services() -> Value {
        json!([
            {"name": "a", "labels": {"prometheus-job": "web", "x": "1"}},
            {"name": "b", "labels": {"prometheus-job": "api"}},
            {"name": "c", "labels": {}},
            {"name": "d", "labels": {"prometheus-job": "web"}}
        ])
    }

    fn names(v: &Value) -> Vec<&str> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|t| t["name"].as_str().expect("name"))
            .collect()
    }

    #[test]
    fn with_label_matches_presence_or_exact_value() {
        let present = with_label(&services(), &args(&[("name", "prometheus-job")])).expect("ok");
        assert_eq!(names(&present), ["a", "b", "d"]);
        let exact = with_label(
            &services(),
            &args(&[("name", "prometheus-job"), ("value", "web")]),
        )
        .expect("ok");
        assert_eq!(names(&exact), ["a", "d"]);
    }

    #[test]
    fn label_returns_the_value_or_the_default() {
        let s = services();
        assert_eq!(
            label(&s[0], &args(&[("name", "x")])).expect("ok"),
            json!("1")
        );
        assert_eq!(
            label(&s[2], &args(&[("name", "x")])).expect("ok"),
            json!("")
        );
        assert_eq!(
            label(&s[2], &args(&[("name", "x"), ("default", "80")])).expect("ok"),
            json!("80")
        );
    }

    #[test]
    fn group_by_label_returns_groups_sorted_by_value() {
        let groups = group_by_label(&services(), &args(&[("name", "prometheus-job")])).expect("ok");
        assert_eq!(names(&groups), ["api", "web"]);
        assert_eq!(names(&groups[1]["items"]), ["a", "d"]);
    }

    #[test]
    fn filters_refuse_values_of_the_wrong_shape() {
        assert!(running(&json!("x"), &args(&[])).is_err());
        assert!(with_label(&json!({}), &args(&[("name", "a")])).is_err());
        assert!(group_by_label(&json!(1), &args(&[("name", "a")])).is_err());
        assert!(label(&json!({}), &HashMap::new()).is_err());
    }
}
