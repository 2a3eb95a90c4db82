//! Stand-in `envoy` for krun's tests; see `krun_tests::fakes::proxy`.

fn main() -> std::process::ExitCode {
    krun_tests::fakes::proxy::run(krun_tests::fakes::proxy::Role::Envoy)
}
