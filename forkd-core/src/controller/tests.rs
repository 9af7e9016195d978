//! Controller behaviour over an in-memory fake backend: events, liveness, caps, locking.

use super::*;
use crate::backend::BranchedChildren;
use crate::exec::{CapturedOutput, ExitStatus, OutputStream};
use std::collections::HashSet;
use std::sync::Condvar;
use std::time::{Duration, Instant};

/// Sandboxes are ids in a set; `kill` makes one "exit"; creates can be held at a gate.
#[derive(Default)]
struct Fake {
    alive: Mutex<HashSet<String>>,
    hold_creates: Mutex<bool>,
    released: Condvar,
}

impl Fake {
    fn kill(&self, id: &SandboxId) {
        lock(&self.alive).remove(id.as_str());
    }
    fn hold(&self, on: bool) {
        *lock(&self.hold_creates) = on;
        self.released.notify_all();
    }
    fn handle(id: &SandboxId) -> RuntimeHandle {
        serde_json::json!({ "id": id.as_str() })
    }
    fn id_of(rt: &RuntimeHandle) -> String {
        rt["id"].as_str().unwrap_or_default().to_string()
    }
}

impl SandboxBackend for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn create(&self, id: &SandboxId, _spec: &SandboxSpec) -> Result<RuntimeHandle> {
        let mut held = lock(&self.hold_creates);
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        lock(&self.alive).insert(id.to_string());
        Ok(Self::handle(id))
    }
    fn exec(
        &self,
        rt: &RuntimeHandle,
        req: &ExecRequest,
        _stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn ExecSink,
        cancel: &CancelToken,
    ) -> Result<ExecOutcome> {
        let started = Instant::now();
        if req.argv[0] == "sleep" {
            let ms: u64 = req.argv.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            while started.elapsed() < Duration::from_millis(ms) {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled("killed".into()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sink.output(OutputStream::Stdout, Self::id_of(rt).as_bytes());
        Ok(ExecOutcome { status: ExitStatus::Code(0), duration: started.elapsed() })
    }
    fn write_file(&self, _: &RuntimeHandle, _: &str, _: u32, _: &mut (dyn Read + Send)) -> Result<u64> {
        Ok(0)
    }
    fn read_file(&self, _: &RuntimeHandle, _: &str, _: &mut (dyn Write + Send)) -> Result<u64> {
        Ok(0)
    }
    fn list_dir(&self, _: &RuntimeHandle, _: &str) -> Result<Vec<DirEntry>> {
        Ok(Vec::new())
    }
    fn branch(&self, _: &RuntimeHandle, children: &[SandboxId], _: &BranchOptions) -> Result<BranchedChildren> {
        let mut alive = lock(&self.alive);
        for c in children {
            alive.insert(c.to_string());
        }
        Ok(BranchedChildren {
            children: children.iter().map(Self::handle).collect(),
            pause: Duration::from_micros(700),
        })
    }
    fn destroy(&self, rt: &RuntimeHandle) -> Result<()> {
        lock(&self.alive).remove(&Self::id_of(rt));
        Ok(())
    }
    fn probe(&self, rt: &RuntimeHandle) -> Liveness {
        if lock(&self.alive).contains(&Self::id_of(rt)) {
            Liveness::Running
        } else {
            Liveness::Exited("VMM process is gone".into())
        }
    }
    fn memory_usage(&self, _: &RuntimeHandle) -> Result<MemoryUsage> {
        Ok(MemoryUsage::default())
    }
    fn console(&self, _: &RuntimeHandle, _: u64) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

fn controller() -> (Arc<Fake>, Arc<Controller>) {
    let fake = Arc::new(Fake::default());
    (fake.clone(), Arc::new(Controller::new(fake)))
}

fn drain(events: &Events) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

#[test]
fn lifecycle_events_in_order() {
    let (_, c) = controller();
    let events = c.events();
    let a = c.create(SandboxSpec::default()).unwrap();
    let branched = c.branch(&a.id, &BranchOptions::count(2)).unwrap();
    c.destroy(&branched.children[0].id).unwrap();
    let got = drain(&events);
    let names: Vec<_> = got.iter().map(Event::name).collect();
    assert_eq!(names, ["created", "created", "created", "branched", "destroyed"]);
    match &got[3].kind {
        EventKind::Branched { source, children, pause } => {
            assert_eq!(source.id, a.id);
            assert_eq!(children.len(), 2);
            assert_eq!(*pause, Duration::from_micros(700));
        }
        other => panic!("{other:?}"),
    }
    match &got[1].kind {
        EventKind::Created { sandbox } => assert_eq!(sandbox.parent.as_ref(), Some(&a.id)),
        other => panic!("{other:?}"),
    }
    assert!(got[3].concerns(&branched.children[1].id));
    assert!(!got[0].concerns(&branched.children[1].id));
}

#[test]
fn dropping_a_subscription_unsubscribes() {
    let (_, c) = controller();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let sub = c.subscribe(move |_| {
        h.fetch_add(1, Ordering::SeqCst);
    });
    c.create(SandboxSpec::default()).unwrap();
    drop(sub);
    c.create(SandboxSpec::default()).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[test]
fn refresh_marks_dead_sandboxes_exited_once() {
    let (fake, c) = controller();
    let a = c.create(SandboxSpec::default()).unwrap();
    let b = c.create(SandboxSpec::default()).unwrap();
    let events = c.events();
    assert!(c.refresh().is_empty());
    fake.kill(&a.id);
    assert_eq!(c.refresh(), vec![a.id.clone()]);
    assert!(c.refresh().is_empty());
    assert!(matches!(c.get(&a.id).unwrap().state, SandboxState::Exited(_)));
    assert_eq!(c.get(&b.id).unwrap().state, SandboxState::Running);
    let got = drain(&events);
    assert_eq!(got.len(), 1);
    assert!(matches!(&got[0].kind, EventKind::Exited { sandbox } if sandbox.id == a.id));
    let err = c.exec(&a.id, &ExecRequest::new(["true"]), None, &mut CapturedOutput::default()).unwrap_err();
    assert_eq!(err.code(), crate::ErrorCode::FailedPrecondition);
}

#[test]
fn refresh_persists_exited_state() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let c = Controller::open(fake.clone(), dir.path(), "test").unwrap();
    let a = c.create(SandboxSpec::default()).unwrap();
    fake.kill(&a.id);
    c.refresh();
    let state = Store::new(dir.path()).load().unwrap();
    assert!(matches!(state.sandboxes[0].info.state, SandboxState::Exited(_)));
}

#[test]
fn concurrent_creates_past_the_cap_are_resource_exhausted() {
    let (fake, c) = controller();
    let c = Arc::new(
        Arc::try_unwrap(c)
            .unwrap_or_else(|_| unreachable!())
            .with_options(ControllerOptions { max_concurrent_creates: Some(1), ..Default::default() }),
    );
    fake.hold(true);
    let c2 = c.clone();
    let first = std::thread::spawn(move || c2.create(SandboxSpec::default()));
    while c.creates.in_flight.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let err = c.create(SandboxSpec::default()).unwrap_err();
    match &err {
        Error::ResourceExhausted { retry_after_ms, .. } => assert!(*retry_after_ms >= 50),
        other => panic!("{other:?}"),
    }
    fake.hold(false);
    first.join().unwrap().unwrap();
    c.create(SandboxSpec::default()).unwrap();
}

#[test]
fn max_sandboxes_counts_branch_children() {
    let fake = Arc::new(Fake::default());
    let c = Controller::new(fake).with_options(ControllerOptions { max_sandboxes: Some(3), ..Default::default() });
    let a = c.create(SandboxSpec::default()).unwrap();
    let err = c.branch(&a.id, &BranchOptions::count(3)).unwrap_err();
    assert_eq!(err.code(), crate::ErrorCode::ResourceExhausted, "{err}");
    c.branch(&a.id, &BranchOptions::count(2)).unwrap();
    assert_eq!(c.create(SandboxSpec::default()).unwrap_err().code(), crate::ErrorCode::ResourceExhausted);
    assert_eq!(c.pending.load(Ordering::SeqCst), 0);
}

#[test]
fn branch_does_not_wait_for_running_commands_but_destroy_cancels_them() {
    let (_, c) = controller();
    let a = c.create(SandboxSpec::default()).unwrap();
    let c2 = c.clone();
    let id = a.id.clone();
    let long = std::thread::spawn(move || {
        c2.exec(&id, &ExecRequest::new(["sleep", "10000"]), None, &mut CapturedOutput::default())
    });
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    c.branch(&a.id, &BranchOptions::count(1)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "branch waited for the command");
    let started = Instant::now();
    c.destroy(&a.id).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "destroy waited for the command");
    assert_eq!(long.join().unwrap().unwrap_err().code(), crate::ErrorCode::Cancelled);
    assert_eq!(c.get(&a.id).unwrap_err().code(), crate::ErrorCode::NotFound);
}

#[test]
fn commands_on_different_sandboxes_run_in_parallel() {
    let (_, c) = controller();
    let ids: Vec<_> = (0..4).map(|_| c.create(SandboxSpec::default()).unwrap().id).collect();
    let started = Instant::now();
    let threads: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut out = CapturedOutput::default();
                c.exec(&id, &ExecRequest::new(["sleep", "300"]), None, &mut out).unwrap();
                assert_eq!(out.stdout, id.as_str().as_bytes());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(started.elapsed() < Duration::from_millis(1100), "{:?}", started.elapsed());
}

#[test]
fn branch_children_record_their_overridden_limits_and_bad_ones_are_refused() {
    let (_, c) = controller();
    let spec = SandboxSpec {
        limits: crate::ResourceLimits { cpus: Some(1.0), pids: Some(64), ..Default::default() },
        ..Default::default()
    };
    let a = c.create(spec).unwrap();
    let opts = BranchOptions {
        count: 2,
        limits: crate::ResourceLimits { cpus: Some(0.25), io_bps: Some(1 << 20), ..Default::default() },
    };
    let branched = c.branch(&a.id, &opts).unwrap();
    for child in &branched.children {
        let limits = &c.get(&child.id).unwrap().spec.limits;
        assert_eq!((limits.cpus, limits.pids, limits.io_bps), (Some(0.25), Some(64), Some(1 << 20)));
    }
    assert_eq!(c.get(&a.id).unwrap().spec.limits.cpus, Some(1.0), "the source keeps its limits");
    let bad = BranchOptions { count: 1, limits: crate::ResourceLimits { cpus: Some(-1.0), ..Default::default() } };
    let err = c.branch(&a.id, &bad).unwrap_err();
    assert_eq!(err.code(), crate::ErrorCode::InvalidArgument, "{err}");
    assert!(err.to_string().contains("limits.cpus"), "{err}");
}
