//! `forkd eval` and `forkd contexts`: run code in a sandbox's long-lived interpreters (code
//! contexts), which keep their state between snippets and are inherited by BRANCH children.

use crate::context::Context;
use anyhow::Context as _;
use clap::Args;
use forkd_core::{CapturedOutput, EvalRequest, OutputStream, SandboxId};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
#[command(after_help = "Examples:
  forkd eval $ID 'import json; data = list(range(10**6))'
  forkd eval $ID 'sum(data)'                      prints 499999500000
  forkd branch $ID -n 4                           each child has `data` too
  echo 'print(len(data))' | forkd eval $ID -     code from stdin
  forkd eval $ID --context scratch --timeout 5 'while True: pass'

The value of a final expression is printed (its repr); an exception prints its traceback and
exits 1. Exit status 124 when --timeout interrupted the snippet.")]
pub struct EvalArgs {
    /// Sandbox id.
    pub id: String,
    /// The code, or `-` to read it from stdin.
    pub code: String,
    /// The context (created on first use; default `main`).
    #[arg(long, short = 'c')]
    pub context: Option<String>,
    /// The interpreter.
    #[arg(long, default_value = "python")]
    pub lang: String,
    /// Interrupt the snippet after this many seconds (the context keeps its state).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Print the result as JSON: `{"value", "json", "error", "stdout", "stderr", "duration_ms", ...}`.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(ctx: &Context, args: EvalArgs) -> anyhow::Result<ExitCode> {
    let cancel = forkd_core::CancelToken::new();
    crate::signals::install(cancel.clone());
    let id = SandboxId::parse(&args.id)?;
    let code = if args.code == "-" {
        let mut code = String::new();
        std::io::stdin().read_to_string(&mut code).context("reading the code from stdin (it must be UTF-8)")?;
        code
    } else {
        args.code.clone()
    };
    let timeout = match args.timeout {
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => anyhow::bail!("invalid --timeout {t}: give a positive number of seconds"),
        None => None,
    };
    let req = EvalRequest { code, context: args.context.clone(), lang: Some(args.lang.clone()), timeout };
    req.validate()?;
    let client = ctx.client()?;
    if args.json {
        let mut out = CapturedOutput::default();
        let result = client.eval(&id, &req, &mut out, &cancel)?;
        let mut value = serde_json::to_value(&result)?;
        value["stdout"] = serde_json::json!(String::from_utf8_lossy(&out.stdout));
        value["stderr"] = serde_json::json!(String::from_utf8_lossy(&out.stderr));
        println!("{value}");
        return Ok(exit_code(&result));
    }
    let mut sink = |stream: OutputStream, data: &[u8]| {
        let _ = match stream {
            OutputStream::Stdout => std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush()),
            OutputStream::Stderr => std::io::stderr().write_all(data),
        };
    };
    let result = match client.eval(&id, &req, &mut sink, &cancel) {
        Ok(r) => r,
        Err(_) if crate::signals::received().is_some() => {
            return Ok(ExitCode::from((128 + crate::signals::received().unwrap_or(libc::SIGINT)) as u8))
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(value) = &result.value {
        println!("{value}");
    }
    if let Some(error) = &result.error {
        let text = if error.traceback.is_empty() {
            format!("{}: {}\n", error.name, error.message)
        } else {
            error.traceback.clone()
        };
        eprint!("{text}");
    }
    if result.restarted {
        eprintln!("forkd: note: context `{}` had lost its interpreter; this snippet ran in a new one", result.context);
    }
    Ok(exit_code(&result))
}

fn exit_code(result: &forkd_core::EvalResult) -> ExitCode {
    match (&result.error, result.timed_out) {
        (_, true) => ExitCode::from(124),
        (Some(_), false) => ExitCode::from(1),
        (None, false) => ExitCode::SUCCESS,
    }
}

#[derive(Args)]
pub struct ContextsArgs {
    /// Sandbox id.
    pub id: String,
    /// End this context instead of listing.
    #[arg(long, value_name = "NAME")]
    pub close: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn contexts(ctx: &Context, args: ContextsArgs) -> anyhow::Result<ExitCode> {
    let id = SandboxId::parse(&args.id)?;
    let client = ctx.client()?;
    if let Some(name) = &args.close {
        client.close_context(&id, name)?;
        println!("closed context {name}");
        return Ok(ExitCode::SUCCESS);
    }
    let list = client.contexts(&id)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!("{:<20} {:<8} {:>7} {:>7}  VERSION", "CONTEXT", "LANG", "PID", "EVALS");
        for c in list {
            println!("{:<20} {:<8} {:>7} {:>7}  {}", c.name, c.lang, c.pid, c.evals, c.version);
        }
    }
    Ok(ExitCode::SUCCESS)
}
