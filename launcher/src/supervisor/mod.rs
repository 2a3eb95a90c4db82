//! The supervisor: starts the extra processes in dependency order, then the app; forwards
//! signals; reaps orphans; and drains everything in order when told to stop.
//!
//! It is a single task that owns every child and reacts to events (exits, readiness, signals,
//! timers), so there is one place that decides what happens next and one exit code.
//!
//! Drain (SIGTERM, the app's exit, or a required process's death):
//! 1. mark krun not ready (the [`Phase`] watch; the tunnel and data plane stop accepting);
//! 2. SIGTERM the app;
//! 3. stop each extra process once nothing that depends on it is running (reverse order:
//!    a proxy outlives the app that talks through it); a process with a graceful stop (Envoy)
//!    has its listeners drained first, and is stopped at its lead time before the deadline
//!    even if dependents still run;
//! 4. at `KRUN_DRAIN_TIMEOUT`, SIGKILL every process group that is left;
//! 5. exit with the app's status (1 when krun itself decided to fail).

mod hooks;
mod signals;

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

pub use signals::{FORWARDED, ForwardedSignals};

use crate::probe::Probe;
use crate::processes::{
    self, APP_NAME, Evidence, MAX_RESTART_BACKOFF, ProcessPlan, ReadyBudget, RestartPolicy, RunAs,
};
use crate::reaper::{ExitStatus, Reaper, signal_group};
use crate::startup::PhaseClock;

/// Where the workload is in its life; other components watch it to know when to accept work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Dependencies or the app are starting.
    Starting,
    /// The app (or, without one, every process) is ready.
    Ready,
    /// Shutting down: accept nothing new.
    Draining,
}

/// The app: what to run and how to know it is ready.
pub struct AppSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The app's `PORT` (`PORT_http`). krun's own `PORT` is the container port, i.e. the
    /// tunnel, so it is never passed on: without an app port the app gets no `PORT`.
    pub port: Option<u16>,
    /// Another user, when krun is root and `K8S_UID` is set.
    pub run_as: Option<RunAs>,
    /// All must pass before the app counts as ready.
    pub readiness: Vec<Probe>,
    /// Added to krun's environment (e.g. `GRPC_XDS_BOOTSTRAP` from the data plane).
    pub env: std::collections::BTreeMap<String, String>,
}

/// Budgets of the supervisor.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From SIGTERM to SIGKILL.
    pub drain: Duration,
    /// How long a process or the app may take to become ready.
    pub ready: Duration,
}

/// One process (or the app) as the admin endpoint shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UnitStatus {
    /// The name from `KRUN_PROCESSES`, or `app`.
    pub name: String,
    /// Its pid while it runs.
    pub pid: Option<i32>,
    /// Whether its readiness checks passed.
    pub ready: bool,
    /// Restarts after failures so far.
    pub restarts: u32,
    /// The lifecycle hook running before it starts (`preStart`), if any.
    pub hook: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnitId {
    App,
    Process(usize),
}

/// Per-unit (process or app) state.
#[derive(Default)]
struct Unit {
    name: String,
    depends_on: Vec<usize>,
    pid: Option<Pid>,
    started: bool,
    ready: bool,
    stop_sent: bool,
    restarts: u32,
    probe: Option<AbortHandle>,
    hook: Option<&'static str>,
}

enum Event {
    Exited {
        unit: UnitId,
        pid: Pid,
        status: ExitStatus,
    },
    Ready {
        unit: UnitId,
        pid: Pid,
    },
    NotReady {
        unit: UnitId,
        pid: Pid,
        why: String,
    },
    RestartDue(usize),
    /// A graceful stop has drained the process: SIGTERM it now.
    StopNow {
        unit: UnitId,
        pid: Pid,
    },
    /// The drain deadline is near: stop a proxy even if dependents still run.
    StopEarly(usize),
    /// Another component stops the workload with an error.
    Fail(String),
    /// The app's preStart hook is done: start the app, or fail with the reason.
    PreStartDone(Result<(), String>),
}

/// Lets another component (e.g. a listener that cannot bind) stop the workload with an error.
#[derive(Clone)]
pub struct FailHandle(mpsc::UnboundedSender<Event>);

impl FailHandle {
    /// Drains krun and makes it exit 1, logging `why`.
    pub fn fail(&self, why: impl Into<String>) {
        let _ = self.0.send(Event::Fail(why.into()));
    }
}

struct Drain {
    deadline: Instant,
    killed: bool,
}

/// Runs the app and the extra processes until they are done; see the module docs.
pub struct Supervisor {
    reaper: Reaper,
    signals: ForwardedSignals,
    plan: ProcessPlan,
    app_spec: Option<AppSpec>,
    timeouts: Timeouts,
    phase: watch::Sender<Phase>,
    /// Every unit's state, for the admin endpoint.
    status: watch::Sender<Vec<UnitStatus>>,
    clock: PhaseClock,
    events: mpsc::UnboundedSender<Event>,
    inbox: mpsc::UnboundedReceiver<Event>,
    processes: Vec<Unit>,
    app: Unit,
    app_status: Option<ExitStatus>,
    /// Why krun fails (exit 1) rather than passing on the app's status.
    failure: Option<String>,
    drain: Option<Drain>,
}

impl Supervisor {
    /// Prepares the supervisor. Must run inside the tokio runtime (it installs signal
    /// handlers and starts the reaper).
    pub fn new(
        plan: ProcessPlan,
        app_spec: Option<AppSpec>,
        timeouts: Timeouts,
        clock: PhaseClock,
    ) -> std::io::Result<Self> {
        let (events, inbox) = mpsc::unbounded_channel();
        let processes = plan
            .processes
            .iter()
            .map(|p| Unit {
                name: p.name.clone(),
                depends_on: p.depends_on.clone(),
                ..Unit::default()
            })
            .collect();
        let app = Unit {
            name: APP_NAME.to_owned(),
            depends_on: plan.app_depends_on.clone(),
            ..Unit::default()
        };
        Ok(Supervisor {
            reaper: Reaper::start()?,
            signals: ForwardedSignals::install()?,
            plan,
            app_spec,
            timeouts,
            phase: watch::Sender::new(Phase::Starting),
            status: watch::Sender::new(Vec::new()),
            clock,
            events,
            inbox,
            processes,
            app,
            app_status: None,
            failure: None,
            drain: None,
        })
    }

    /// The reaper, for work that must spawn processes after [`Supervisor::run`] (e.g. removing
    /// the capture rules).
    pub fn reaper(&self) -> Reaper {
        self.reaper.clone()
    }

    /// Watches the workload's phase: the hook the tunnel and data plane use to stop accepting.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Watches every unit's state (pid, readiness, restarts).
    pub fn status(&self) -> watch::Receiver<Vec<UnitStatus>> {
        self.status.subscribe()
    }

    /// The startup clock, for phases that run before the supervisor takes over.
    pub fn clock(&mut self) -> &mut PhaseClock {
        &mut self.clock
    }

    /// A handle to stop the workload from outside the supervisor.
    pub fn fail_handle(&self) -> FailHandle {
        FailHandle(self.events.clone())
    }

    /// Runs until every child is gone; returns krun's exit code.
    pub async fn run(mut self) -> u8 {
        self.start_what_is_due();
        self.publish_status();
        while !self.finished() {
            let kill_at = self
                .drain
                .as_ref()
                .filter(|d| !d.killed)
                .map(|d| d.deadline);
            tokio::select! {
                Some(event) = self.inbox.recv() => self.on_event(event),
                signal = self.signals.recv() => self.on_signal(signal),
                () = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => self.kill_all(),
            }
            self.publish_status();
        }
        self.reap_leftovers().await;
        self.exit_code()
    }

    /// Publishes the units' state when it changed.
    fn publish_status(&self) {
        let app = self.app_spec.as_ref().map(|_| &self.app);
        let now: Vec<UnitStatus> = self
            .processes
            .iter()
            .chain(app)
            .map(|unit| UnitStatus {
                name: unit.name.clone(),
                pid: unit.pid.map(Pid::as_raw),
                ready: unit.ready,
                restarts: unit.restarts,
                hook: unit.hook,
            })
            .collect();
        self.status.send_if_modified(|status| {
            let changed = *status != now;
            if changed {
                *status = now;
            }
            changed
        });
    }

    fn unit(&mut self, id: UnitId) -> &mut Unit {
        match id {
            UnitId::App => &mut self.app,
            UnitId::Process(i) => &mut self.processes[i],
        }
    }

    fn deps_ready(&self, deps: &[usize]) -> bool {
        deps.iter().all(|&d| self.processes[d].ready)
    }

    /// Starts every unit whose dependencies are ready and that has not started yet.
    fn start_what_is_due(&mut self) {
        if self.drain.is_some() {
            return;
        }
        for i in 0..self.processes.len() {
            if !self.processes[i].started && self.deps_ready(&self.processes[i].depends_on) {
                self.start_process(i);
            }
        }
        if !self.app.started && self.deps_ready(&self.app.depends_on) && self.drain.is_none() {
            if !self.processes.is_empty() {
                self.clock.mark("dependencies");
            }
            self.start_app();
        }
    }

    fn start_process(&mut self, i: usize) {
        let spec = &self.plan.processes[i];
        let Some(mut command) = processes::command(&spec.command) else {
            return;
        };
        command.envs(&spec.env);
        if let Some(dir) = &spec.cwd {
            command.current_dir(dir);
        }
        if let Some(run_as) = &spec.run_as {
            run_as.apply(&mut command);
        }
        let probe = spec.readiness.clone();
        self.launch(
            UnitId::Process(i),
            &mut command,
            probe.into_iter().collect(),
        );
    }

    fn start_app(&mut self) {
        self.app.started = true;
        let Some(spec) = self.app_spec.as_ref() else {
            // Sidecar mode: ready once every process is.
            self.app.ready = true;
            self.set_ready();
            return;
        };
        match self.plan.app_hooks.pre_start.as_deref() {
            Some(hook) => {
                let command = app_command(spec, hook);
                let events = self.events.clone();
                let done = move |result| {
                    let _ = events.send(Event::PreStartDone(result));
                };
                match hooks::pre_start(&self.reaper, command, hook, done) {
                    Ok(pid) => {
                        self.app.hook = Some("preStart");
                        // Published before the log line, as for a start.
                        self.publish_status();
                        tracing::info!(
                            hook = "preStart",
                            program = hook.first().map_or("", String::as_str),
                            pid = pid.as_raw(),
                            "running the app's hook"
                        );
                    }
                    Err(why) => self.fail(why),
                }
            }
            None => self.launch_app(),
        }
    }

    fn launch_app(&mut self) {
        let Some(spec) = self.app_spec.as_ref() else {
            return;
        };
        let Some(mut command) = app_command(spec, &spec.argv) else {
            return;
        };
        let readiness = spec.readiness.clone();
        self.launch(UnitId::App, &mut command, readiness);
    }

    /// Spawns a unit and, if it has probes, a task that reports when they all pass.
    fn launch(&mut self, id: UnitId, command: &mut std::process::Command, probes: Vec<Probe>) {
        let name = self.unit(id).name.clone();
        let child = match self.reaper.spawn(command) {
            Ok(child) => child,
            Err(e) => {
                let program = command.get_program().to_string_lossy().into_owned();
                return self.fail(format!("cannot start {name} ({program}): {e}; check the command exists in PATH and is executable"));
            }
        };
        let pid = child.pid;
        let unit = self.unit(id);
        unit.started = true;
        unit.pid = Some(pid);
        unit.stop_sent = false;
        // Published before the log line, so whoever saw the line sees the pid on the admin
        // endpoint too.
        self.publish_status();
        tracing::info!(process = %name, pid = pid.as_raw(), "started");
        let events = self.events.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.exit.await {
                let _ = events.send(Event::Exited {
                    unit: id,
                    pid,
                    status,
                });
            }
        });
        if self.unit(id).ready {
            return; // a restart: dependents are already running
        }
        let reaper = self.reaper.clone();
        let events = self.events.clone();
        let (budget, _) = self.ready_budget(id);
        let evidence = self.evidence(id);
        let deadline = Instant::now() + budget;
        let task = tokio::spawn(async move {
            for probe in &probes {
                if let Err(why) = probe.wait(&reaper, deadline).await {
                    let mut why = format!("{}: {why}", probe.check);
                    if let Some(evidence) = evidence {
                        why = format!("{why}; {}", save_evidence(&evidence).await);
                    }
                    let _ = events.send(Event::NotReady { unit: id, pid, why });
                    return;
                }
            }
            let _ = events.send(Event::Ready { unit: id, pid });
        });
        self.unit(id).probe = Some(task.abort_handle());
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { unit, pid } if self.unit(unit).pid == Some(pid) => self.on_ready(unit),
            Event::NotReady { unit, pid, why } if self.unit(unit).pid == Some(pid) => {
                let name = self.unit(unit).name.clone();
                let (budget, variable) = self.ready_budget(unit);
                let budget = humantime::format_duration(budget);
                self.fail(format!("{name} not ready after {budget}: {why}; check that it listens there, or raise {variable}"));
            }
            Event::Exited { unit, pid, status } if self.unit(unit).pid == Some(pid) => {
                self.on_exit(unit, status)
            }
            Event::RestartDue(i) if self.drain.is_none() => self.start_process(i),
            Event::Fail(why) => self.fail(why),
            Event::PreStartDone(result) => {
                self.app.hook = None;
                match result {
                    Ok(()) if self.drain.is_none() => {
                        self.clock.mark("prestart");
                        self.launch_app();
                    }
                    Ok(()) => {}
                    Err(why) => self.fail(why),
                }
            }
            Event::StopNow { unit, pid } if self.unit(unit).pid == Some(pid) => {
                tracing::info!(process = %self.unit(unit).name, pid = pid.as_raw(), "drained; stopping");
                send(pid, Signal::SIGTERM);
            }
            Event::StopEarly(i)
                if self.processes[i].pid.is_some() && !self.processes[i].stop_sent =>
            {
                tracing::warn!(process = %self.processes[i].name, "drain deadline near: stopping it while what depends on it still runs");
                self.stop_process(i);
            }
            _ => {} // stale: about an earlier incarnation, or a restart cancelled by the drain
        }
    }

    fn ready_budget_spec(&self, id: UnitId) -> Option<&ReadyBudget> {
        match id {
            UnitId::App => None,
            UnitId::Process(i) => self.plan.processes[i].ready_budget.as_ref(),
        }
    }

    /// The readiness budget of a unit and the variable that sets it.
    fn ready_budget(&self, id: UnitId) -> (Duration, &'static str) {
        match self.ready_budget_spec(id) {
            Some(b) => (b.timeout, b.variable),
            None => (self.timeouts.ready, "KRUN_APP_READY_TIMEOUT"),
        }
    }

    fn evidence(&self, id: UnitId) -> Option<Evidence> {
        self.ready_budget_spec(id)?.evidence.clone()
    }

    fn on_ready(&mut self, id: UnitId) {
        let unit = self.unit(id);
        unit.ready = true;
        unit.probe = None;
        tracing::info!(process = %unit.name, "ready");
        if id == UnitId::App {
            self.clock.mark("app-ready");
            self.set_ready();
        }
        self.start_what_is_due();
    }

    fn set_ready(&mut self) {
        if self.drain.is_none() {
            self.phase.send_replace(Phase::Ready);
        }
    }

    fn on_exit(&mut self, id: UnitId, status: ExitStatus) {
        let unit = self.unit(id);
        unit.pid = None;
        if let Some(probe) = unit.probe.take() {
            probe.abort();
        }
        let name = unit.name.clone();
        match id {
            UnitId::App => {
                tracing::info!(%status, "app exited");
                self.app_status = Some(status);
                self.start_drain(&format!("the app exited with {status}"));
            }
            UnitId::Process(_) if self.drain.is_some() => {
                tracing::info!(process = %name, %status, "stopped")
            }
            UnitId::Process(i) => self.on_process_exit(i, status),
        }
        self.stop_what_is_unneeded();
    }

    fn on_process_exit(&mut self, i: usize, status: ExitStatus) {
        let spec = &self.plan.processes[i];
        let unit = &mut self.processes[i];
        if let RestartPolicy::OnFailure {
            max_restarts,
            backoff,
        } = spec.restart
            && !status.success()
            && unit.restarts < max_restarts
        {
            let delay = backoff
                .saturating_mul(1 << unit.restarts.min(16))
                .min(MAX_RESTART_BACKOFF);
            unit.restarts += 1;
            crate::telemetry::PROCESS_RESTARTS
                .get_or_create(&vec![("process", spec.name.clone())])
                .inc();
            tracing::warn!(
                process = %spec.name, %status, attempt = unit.restarts, max_restarts,
                delay = %humantime::format_duration(delay), "process failed; restarting"
            );
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = events.send(Event::RestartDue(i));
            });
            return;
        }
        let how = format!(
            "process {} exited with {status} (restart: {})",
            spec.name,
            restart_name(spec.restart)
        );
        if spec.required {
            self.fail(format!("{how}; it is required, so krun stops"));
        } else {
            tracing::warn!("{how}; not required, continuing without it");
            // What waits for it must not wait forever: a dependency that is gone for good
            // counts as settled.
            self.processes[i].ready = true;
            self.start_what_is_due();
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        let sidecar_mode = self.app_spec.is_none();
        match signal {
            Signal::SIGTERM if self.drain.is_none() => self.start_drain("SIGTERM received"),
            Signal::SIGINT if sidecar_mode && self.drain.is_none() => {
                self.start_drain("SIGINT received")
            }
            _ => match self.app.pid {
                Some(pid) => {
                    tracing::info!(
                        signal = signal.as_str(),
                        pid = pid.as_raw(),
                        "forwarding signal to the app"
                    );
                    send(pid, signal);
                }
                None => tracing::info!(
                    signal = signal.as_str(),
                    "signal received with no app running; ignored"
                ),
            },
        }
    }

    /// Records why krun fails and starts the drain.
    fn fail(&mut self, why: String) {
        tracing::error!("{why}");
        if self.failure.is_none() {
            self.failure = Some(why.clone());
        }
        self.start_drain(&why);
    }

    fn start_drain(&mut self, cause: &str) {
        if self.drain.is_some() {
            return;
        }
        self.phase.send_replace(Phase::Draining);
        let budget = self.timeouts.drain;
        tracing::info!(cause, budget = %humantime::format_duration(budget), "draining");
        self.drain = Some(Drain {
            deadline: Instant::now() + budget,
            killed: false,
        });
        for unit in self.processes.iter_mut().chain([&mut self.app]) {
            if let Some(probe) = unit.probe.take() {
                probe.abort();
            }
        }
        let deadline = Instant::now() + budget;
        if let Some(pid) = self.app.pid {
            self.app.stop_sent = true;
            let hook = self.plan.app_hooks.pre_stop.as_deref();
            match (hook, self.app_spec.as_ref()) {
                (Some(hook), Some(spec)) => {
                    let command = app_command(spec, hook);
                    let events = self.events.clone();
                    let then = move || {
                        let unit = UnitId::App;
                        let _ = events.send(Event::StopNow { unit, pid });
                    };
                    if let Err(why) = hooks::pre_stop(&self.reaper, command, hook, deadline, then) {
                        tracing::warn!("{why}; stopping the app without it");
                        send(pid, Signal::SIGTERM);
                    }
                }
                _ => send(pid, Signal::SIGTERM),
            }
        }
        for (i, spec) in self.plan.processes.iter().enumerate() {
            if let Some(graceful) = &spec.graceful_stop {
                let events = self.events.clone();
                let at = deadline
                    .checked_sub(graceful.lead)
                    .unwrap_or_else(Instant::now);
                tokio::spawn(async move {
                    sleep_until(at).await;
                    let _ = events.send(Event::StopEarly(i));
                });
            }
        }
        self.stop_what_is_unneeded();
    }

    /// Stops a process: at once with SIGTERM, or through its graceful stop (drain, wait until
    /// idle or the drain deadline, then SIGTERM).
    fn stop_process(&mut self, i: usize) {
        let Some(pid) = self.processes[i].pid else {
            return;
        };
        self.processes[i].stop_sent = true;
        tracing::info!(process = %self.processes[i].name, pid = pid.as_raw(), "stopping");
        // A process that never became ready carries no connections worth draining.
        let graceful = self.plan.processes[i].graceful_stop.clone();
        let Some(graceful) = graceful.filter(|_| self.processes[i].ready) else {
            return send(pid, Signal::SIGTERM);
        };
        let deadline = self
            .drain
            .as_ref()
            .map_or_else(Instant::now, |d| d.deadline);
        let (reaper, events) = (self.reaper.clone(), self.events.clone());
        let name = self.processes[i].name.clone();
        tokio::spawn(async move {
            match crate::probe::http_post(&graceful.drain_url).await {
                Ok(status) => {
                    tracing::info!(process = %name, url = %graceful.drain_url, status, "draining listeners")
                }
                Err(e) => {
                    tracing::warn!(process = %name, url = %graceful.drain_url, error = %e, "cannot drain listeners")
                }
            }
            if let Err(why) = graceful.idle.wait(&reaper, deadline).await {
                tracing::warn!(process = %name, %why, "connections still open at the drain deadline");
            }
            let _ = events.send(Event::StopNow {
                unit: UnitId::Process(i),
                pid,
            });
        });
    }

    /// During a drain, SIGTERMs each process once nothing running depends on it.
    fn stop_what_is_unneeded(&mut self) {
        if self.drain.is_none() {
            return;
        }
        let app_running = self.app.pid.is_some();
        for i in 0..self.processes.len() {
            let unit = &self.processes[i];
            if unit.pid.is_none() || unit.stop_sent {
                continue;
            }
            let needed = (app_running && self.app.depends_on.contains(&i))
                || self
                    .processes
                    .iter()
                    .any(|other| other.pid.is_some() && other.depends_on.contains(&i));
            if !needed {
                self.stop_process(i);
            }
        }
    }

    /// The drain budget is spent: SIGKILL every process group that is left.
    fn kill_all(&mut self) {
        let running: Vec<&str> = self
            .processes
            .iter()
            .chain([&self.app])
            .filter(|u| u.pid.is_some())
            .map(|u| u.name.as_str())
            .collect();
        tracing::warn!(?running, "drain timeout; killing what is left");
        // Each unit leads its own process group; a group whose leader is still running cannot
        // have been recycled, so this reaches exactly what the unit started.
        for unit in self.processes.iter().chain([&self.app]) {
            if let Some(pid) = unit.pid {
                signal_group(pid, Signal::SIGKILL);
            }
        }
        if let Some(drain) = &mut self.drain {
            drain.killed = true;
        }
    }

    fn finished(&self) -> bool {
        self.drain.is_some()
            && self
                .processes
                .iter()
                .chain([&self.app])
                .all(|u| u.pid.is_none())
    }

    /// Kills whatever the children left behind and waits until it is reaped, so krun never
    /// exits with a zombie or a stray process behind it. As subreaper (or PID 1) krun inherits
    /// every orphaned descendant, so killing its own children until none are left reaches all
    /// of them, and never a recycled process group id of an unrelated process.
    async fn reap_leftovers(&mut self) {
        let grace = self.drain.as_ref().map_or(Duration::ZERO, |d| {
            d.deadline.saturating_duration_since(Instant::now())
        });
        let give_up = Instant::now() + grace.max(Duration::from_secs(1));
        // A killed orphan's own children are re-parented to krun in turn: repeat until none.
        while self.reaper.has_children()
            && self.reaper.kill_children() > 0
            && Instant::now() < give_up
        {
            let round = (Instant::now() + Duration::from_millis(50)).min(give_up);
            let _ = tokio::time::timeout_at(round, self.reaper.all_reaped()).await;
        }
        if tokio::time::timeout_at(give_up, self.reaper.all_reaped())
            .await
            .is_err()
        {
            tracing::warn!("some processes are still running after krun killed them");
        }
    }

    fn exit_code(&self) -> u8 {
        match (&self.failure, self.app_status) {
            (Some(why), app) => {
                let app = app.map_or("not running".to_owned(), |s| s.to_string());
                tracing::error!(app = %app, "krun exits 1: {why}");
                1
            }
            (None, Some(status)) => status.exit_code(),
            (None, None) => 0,
        }
    }
}

/// A command for `argv` (the app or one of its hooks) with the app's environment, `PORT` and
/// user.
fn app_command(spec: &AppSpec, argv: &[String]) -> Option<std::process::Command> {
    let mut command = processes::command(argv)?;
    command.envs(&spec.env);
    match spec.port {
        Some(port) => command.env("PORT", port.to_string()),
        None => command.env_remove("PORT"),
    };
    if let Some(run_as) = &spec.run_as {
        run_as.apply(&mut command);
    }
    Some(command)
}

/// Fetches and writes a never-ready process's diagnostics; returns the sentence for the error.
async fn save_evidence(evidence: &Evidence) -> String {
    let Evidence { what, url, path } = evidence;
    let fetched = tokio::time::timeout(
        Duration::from_secs(5),
        crate::probe::http_get(url, 64 << 20),
    )
    .await
    .unwrap_or_else(|_| Err("no answer within 5s".to_owned()));
    let saved = match fetched {
        Ok((200, body)) => mesh::files::write_atomic(path, &body, mesh::files::Access::Private)
            .map_err(|e| e.to_string()),
        Ok((status, _)) => Err(format!("{url} answered HTTP {status}")),
        Err(e) => Err(format!("{url}: {e}")),
    };
    match saved {
        Ok(()) => format!("{what} saved to {}", path.display()),
        Err(e) => format!("{what} not saved: {e}"),
    }
}

fn send(pid: Pid, signal: Signal) {
    if let Err(e) = nix::sys::signal::kill(pid, signal) {
        tracing::warn!(pid = pid.as_raw(), signal = signal.as_str(), error = %e, "cannot signal process");
    }
}

fn restart_name(policy: RestartPolicy) -> &'static str {
    match policy {
        RestartPolicy::Never => "never",
        RestartPolicy::OnFailure { .. } => "on-failure, retries exhausted",
    }
}
