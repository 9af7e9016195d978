//! Code contexts on real KVM microVMs (the `default` image, which has Python): a context keeps
//! its state between snippets, BRANCH children inherit it as it was and then diverge without
//! touching the source's, and timeouts, exceptions, crashes and bad input are reported without
//! losing the sandbox. One Python source per binary; every test works in its own BRANCH child.

mod common;

use common::*;
use forkd_core::{
    BranchOptions, CancelToken, CapturedOutput, Error, EvalRequest, EvalResult, SandboxId, SandboxInfo, SandboxSpec,
};
use std::sync::OnceLock;
use std::time::Duration;

static PYTHON_SOURCE: OnceLock<SandboxInfo> = OnceLock::new();

/// A `default`-image sandbox whose `main` context already holds `data` and `x`.
fn python_source() -> &'static SandboxInfo {
    PYTHON_SOURCE.get_or_init(|| {
        let spec = SandboxSpec { image: "default".into(), ..Default::default() };
        let source =
            controller().create(spec).expect("boot a sandbox of the default image (scripts/setup.sh builds it)");
        let warmed = eval_ok(&source.id, "main", "data = list(range(100000)); x = 1; len(data)");
        assert!(warmed.created, "{warmed:?}");
        source
    })
}

fn child() -> SandboxId {
    controller().branch(&python_source().id, &BranchOptions::count(1)).expect("branch").children[0].id.clone()
}

fn eval_in(id: &SandboxId, context: &str, code: &str, timeout: Option<Duration>) -> (EvalResult, String, String) {
    let req = EvalRequest { code: code.into(), context: Some(context.into()), timeout, ..Default::default() };
    let mut out = CapturedOutput::default();
    let result = controller()
        .eval(id, &req, &mut out, &CancelToken::new())
        .unwrap_or_else(|e| panic!("eval {code:?} in {id}: {e}"));
    (result, String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Runs `code`; panics on an exception.
fn eval_ok(id: &SandboxId, context: &str, code: &str) -> EvalResult {
    let (result, _, stderr) = eval_in(id, context, code, None);
    assert!(result.error.is_none(), "{code:?} raised {:?}\n{stderr}", result.error);
    result
}

fn value(id: &SandboxId, code: &str) -> String {
    eval_ok(id, "main", code).value.unwrap_or_default()
}

#[test]
fn branch_children_inherit_a_context_then_diverge_without_touching_the_source() {
    let source = &python_source().id;
    let kids = controller().branch(source, &BranchOptions::count(2)).expect("branch").children;
    let (a, b) = (&kids[0].id, &kids[1].id);
    // The children's interpreters are the source's, as it was: no start-up, the data loaded.
    let inherited = eval_ok(a, "main", "x, len(data)");
    assert!(!inherited.created, "{inherited:?}");
    assert_eq!(inherited.value.as_deref(), Some("(1, 100000)"));
    assert_eq!(inherited.json, Some(serde_json::json!([1, 100000])));
    eval_ok(a, "main", "x = 'a'; data.append(-1)");
    eval_ok(b, "main", "x = 'b'");
    assert_eq!(value(a, "x, data[-1]"), "('a', -1)");
    assert_eq!(value(b, "x, data[-1]"), "('b', 99999)");
    assert_eq!(value(source, "x, data[-1]"), "(1, 99999)");
    let (printed, stdout, _) = eval_in(a, "main", "print('from a'); 6 * 7", None);
    assert_eq!((stdout.as_str(), printed.value.as_deref()), ("from a\n", Some("42")));
    for kid in &kids {
        controller().destroy(&kid.id).unwrap();
    }
}

#[test]
fn timeouts_exceptions_and_crashes_leave_the_sandbox_usable() {
    let id = child();
    let (looped, _, _) = eval_in(&id, "main", "while True: pass", Some(Duration::from_secs(2)));
    assert!(looped.timed_out, "{looped:?}");
    assert_eq!(looped.error.as_ref().map(|e| e.name.as_str()), Some("KeyboardInterrupt"));
    assert_eq!(value(&id, "x"), "1");
    let (raised, _, _) = eval_in(&id, "main", "1 / 0", None);
    let error = raised.error.expect("an exception");
    assert_eq!(error.name, "ZeroDivisionError");
    assert!(error.traceback.contains("ZeroDivisionError"), "{}", error.traceback);
    assert_eq!(value(&id, "x"), "1");
    // A second, independent context; then its interpreter dies and comes back new.
    let other = eval_ok(&id, "scratch", "y = 5; y");
    assert!(other.created);
    let names: Vec<String> = controller().contexts(&id).unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["main", "scratch"]);
    let (lost, _, _) = eval_in(&id, "scratch", "import os; os._exit(7)", None);
    assert_eq!(lost.error.map(|e| e.name).as_deref(), Some("ContextLost"));
    let again = eval_ok(&id, "scratch", "'y' in globals()");
    assert_eq!(again.value.as_deref(), Some("False"));
    controller().close_context(&id, "scratch").unwrap();
    assert!(matches!(controller().close_context(&id, "scratch"), Err(Error::NotFound { .. })));
    // Bad input is refused before it reaches the guest, or reported as the snippet's error.
    let bad = |req: EvalRequest| controller().eval(&id, &req, &mut CapturedOutput::default(), &CancelToken::new());
    let name = EvalRequest { context: Some("no spaces".into()), ..EvalRequest::new("1") };
    assert!(matches!(bad(name), Err(Error::InvalidArgument { .. })));
    assert!(matches!(bad(EvalRequest::new("x".repeat(2 << 20))), Err(Error::InvalidArgument { .. })));
    assert!(bad(EvalRequest::new("1\u{0}2")).unwrap().error.is_some());
    assert_eq!(value(&id, "x"), "1");
    controller().destroy(&id).unwrap();
}

#[test]
fn an_image_without_python_says_so() {
    let tiny = fresh();
    let err = controller().eval(&tiny, &EvalRequest::new("1"), &mut CapturedOutput::default(), &CancelToken::new());
    let text = err.unwrap_err().to_string();
    assert!(text.contains("python3") && text.contains("--image default"), "{text}");
    controller().destroy(&tiny).unwrap();
}
