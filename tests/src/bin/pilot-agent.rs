//! Stand-in `pilot-agent` for krun's tests; see `krun_tests::fakes::proxy`.

fn main() -> std::process::ExitCode {
    krun_tests::fakes::proxy::run(krun_tests::fakes::proxy::Role::PilotAgent)
}
