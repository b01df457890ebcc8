//! A bounded fuzz run inside `cargo test`, for machines without cargo-fuzz (it needs
//! libfuzzer-sys and a nightly-flagged build; see fuzz/README.md for the deeper run).
//!
//! Each target's body is the very file the cargo-fuzz target calls (fuzz/bodies/). A target
//! first gets its committed corpus (fuzz/corpus/NAME/), then mutants of it for
//! `DROVER_FUZZ_SECONDS` (default 10): bit flips, byte and token inserts, deletions,
//! duplications and splices of corpus entries, from a seeded PRNG (`DROVER_FUZZ_SEED`, by
//! default one fixed seed per target, so a run is repeatable up to where the time ends).
//! An input fails the run when the body panics, when one allocation in it asks for more
//! than 64 MB (the counting allocator below), or when it takes more than 10 s. A failing
//! input is saved under target/tmp/fuzz-smoke/; copied into the target's corpus it is
//! replayed first on every later run.
//!
//! Without coverage feedback this finds less than libFuzzer: it is a floor that runs
//! everywhere, not a replacement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../fuzz/bodies/agent_request.rs"]
mod agent_request;
#[path = "../fuzz/bodies/allow_rules.rs"]
mod allow_rules;
#[path = "../fuzz/bodies/config.rs"]
mod config;
#[path = "../fuzz/bodies/labels.rs"]
mod labels;
#[path = "../fuzz/bodies/webhook_payload.rs"]
mod webhook_payload;
#[path = "../fuzz/bodies/webhook_verify.rs"]
mod webhook_verify;

/// libFuzzer's `-malloc_limit_mb=64` as scripts/test used it.
const ALLOC_LIMIT: usize = 64 << 20;
/// Larger requests are refused outright (the process aborts with the size) rather than
/// taking a shared machine's memory; between the two limits they are served and reported.
const ALLOC_REFUSE: usize = 1 << 30;
/// libFuzzer's `-max_len=65536`.
const MAX_LEN: usize = 64 << 10;
/// libFuzzer's `-timeout=10`: a generous bound, measured after the input returns.
const INPUT_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    // Per thread, because libtest runs the targets side by side in this one process. Const
    // initialised `Cell`s need no destructor, so touching them inside the allocator never
    // allocates.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping
// touches only thread-local cells.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > ALLOC_REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > ALLOC_REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size > ALLOC_REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`; `ptr` came from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// splitmix64: tiny, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// FNV-1a, for default seeds and file names of saved inputs.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Tokens that tend to matter to these parsers: separators and terminators of nginx, YAML,
/// JSON, image references and header values, unicode line breaks, numbers at the edges.
const TOKENS: &[&str] = &[
    "\n",
    "\r\n",
    "\0",
    " ",
    "\t",
    ";",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "\\",
    "$",
    "#",
    ":",
    "/",
    "@",
    "+",
    "-",
    ".",
    "..",
    "*",
    "&a",
    "*a",
    "!!",
    "- ",
    ": ",
    "sha256=",
    "sha1=",
    "sha256:",
    ":latest",
    "localhost:5000/",
    "\u{2028}",
    "\u{85}",
    "\u{feff}",
    "é",
    "0",
    "-1",
    "65535",
    "65536",
    "4294967296",
    "9223372036854775807",
    "18446744073709551616",
    "1e309",
    "300000000000years",
    "0s",
    "1ns",
    "999999h",
    "(",
    ")",
    "|",
    "?",
    "{1000}",
    "{1000,}",
    "\\p{L}",
    "(?i)",
    "[^",
    "routing-",
    "hooks:",
    "targets:",
    "\n  - ",
];

fn mutate(input: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut Rng) {
    let len = input.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = [0, 0xff, 0x7f, 0x80, b'\n', b'"', b'{', b'%'][rng.below(8)];
        }
        2 => {
            let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
            let at = rng.below(len + 1);
            let times = if rng.chance(8) { 1 + rng.below(64) } else { 1 };
            for _ in 0..times {
                input.splice(at..at, token.iter().copied());
            }
        }
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        4 | 5 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(16)).min(len);
            input.drain(from..to);
        }
        6 if len > 0 => {
            // Duplicate a range, sometimes many times: long values and deep nesting.
            let from = rng.below(len);
            let to = (from + 1 + rng.below(32)).min(len);
            let piece = input[from..to].to_vec();
            let times = if rng.chance(4) { 1 + rng.below(256) } else { 1 };
            let at = rng.below(len + 1);
            for _ in 0..times {
                input.splice(at..at, piece.iter().copied());
            }
        }
        _ => {
            // Splice: a piece of another input in place of a piece of this one.
            let other = &pool[rng.below(pool.len())];
            if other.is_empty() {
                return;
            }
            let from = rng.below(other.len());
            let to = (from + 1 + rng.below(other.len() - from)).min(other.len());
            let at = rng.below(len + 1);
            let cut = (at + rng.below(len - at + 1)).min(len);
            input.splice(at..cut, other[from..to].iter().copied());
        }
    }
    input.truncate(MAX_LEN);
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .collect()
}

#[derive(Default)]
struct Stats {
    runs: u64,
    allocations: u64,
    largest: usize,
    slowest: Duration,
}

/// Runs one input; on a failure saves it and fails the test with how to replay it.
fn run_one(name: &str, target: fn(&[u8]), input: &[u8], stats: &mut Stats) {
    LARGEST.with(|l| l.set(0));
    COUNT.with(|c| c.set(0));
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| target(input)));
    let took = start.elapsed();
    let largest = LARGEST.with(Cell::get);
    stats.runs += 1;
    stats.allocations += COUNT.with(Cell::get);
    stats.largest = stats.largest.max(largest);
    stats.slowest = stats.slowest.max(took);
    let failure = match outcome {
        Err(_) => Some("panicked (message above)".to_owned()),
        Ok(()) if largest > ALLOC_LIMIT => Some(format!(
            "made one allocation of {largest} bytes (limit {ALLOC_LIMIT})"
        )),
        Ok(()) if took > INPUT_TIMEOUT => Some(format!("took {took:?} (limit {INPUT_TIMEOUT:?})")),
        Ok(()) => None,
    };
    if let Some(failure) = failure {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
        let file = dir.join(format!("{name}-{:016x}", fnv(input)));
        let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, input));
        panic!(
            "fuzz target {name} {failure} on input {:?}\nsaved: {} ({saved:?}); copy it into \
             fuzz/corpus/{name}/ to replay it first on every run",
            String::from_utf8_lossy(&input[..input.len().min(512)]),
            file.display(),
        );
    }
}

fn smoke(name: &str, target: fn(&[u8])) {
    let corpus = load_corpus(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name),
    );
    assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
    let budget = std::env::var("DROVER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_secs_f64);
    let seed = std::env::var("DROVER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| fnv(name.as_bytes()));
    let mut stats = Stats::default();
    for input in &corpus {
        run_one(name, target, input, &mut stats);
    }
    // Mutants are kept in a bounded pool beside the corpus so mutations stack over rounds.
    const KEPT: usize = 256;
    let mut rng = Rng(seed);
    let mut pool = corpus.clone();
    let start = Instant::now();
    while start.elapsed() < budget {
        let base = if rng.chance(2) {
            rng.below(corpus.len())
        } else {
            rng.below(pool.len())
        };
        let mut input = pool[base].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut input, &pool, &mut rng);
        }
        run_one(name, target, &input, &mut stats);
        if pool.len() < corpus.len() + KEPT {
            pool.push(input);
        } else {
            let slot = corpus.len() + rng.below(KEPT);
            pool[slot] = input;
        }
    }
    println!(
        "fuzz smoke {name}: seed {seed}, {} corpus inputs, {} runs in {:.1?}, {} allocations, \
         largest single allocation {} bytes, slowest input {:.1?}",
        corpus.len(),
        stats.runs,
        start.elapsed(),
        stats.allocations,
        stats.largest,
        stats.slowest,
    );
}

#[test]
fn smoke_agent_request() {
    smoke("agent_request", agent_request::run);
}

#[test]
fn smoke_allow_rules() {
    smoke("allow_rules", allow_rules::run);
}

#[test]
fn smoke_config() {
    smoke("config", config::run);
}

#[test]
fn smoke_labels() {
    smoke("labels", labels::run);
}

#[test]
fn smoke_webhook_payload() {
    smoke("webhook_payload", webhook_payload::run);
}

#[test]
fn smoke_webhook_verify() {
    smoke("webhook_verify", webhook_verify::run);
}

/// The harness itself: a panic and an allocation over the limit each fail the input (a
/// zeroed allocation, so the 64 MB are never touched).
#[test]
fn harness_fails_on_a_panic_and_on_a_large_allocation() {
    fn message(outcome: std::thread::Result<()>) -> String {
        let payload = outcome.expect_err("the input must fail the run");
        payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default()
    }
    let big = message(catch_unwind(|| {
        run_one(
            "harness",
            |_| drop(std::hint::black_box(vec![0u8; ALLOC_LIMIT + 1])),
            b"big",
            &mut Stats::default(),
        )
    }));
    assert!(
        big.contains(&format!("allocation of {} bytes", ALLOC_LIMIT + 1)),
        "{big}"
    );
    let small = catch_unwind(|| {
        run_one(
            "harness",
            |_| drop(std::hint::black_box(vec![0u8; ALLOC_LIMIT])),
            b"small",
            &mut Stats::default(),
        )
    });
    assert!(small.is_ok(), "an allocation at the limit is allowed");
    let panicked = message(catch_unwind(|| {
        run_one(
            "harness",
            |data| assert!(data.is_empty(), "not empty"),
            b"x",
            &mut Stats::default(),
        )
    }));
    assert!(panicked.contains("harness panicked"), "{panicked}");
}
