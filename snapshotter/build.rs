//! Compiles Beam's control API (`proto/beam/control/v1/control.proto`) with tonic-build, the
//! same tonic generation containerd-snapshots uses, so the daemon serves both on one server.

fn main() {
    let proto = "../proto/beam/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&[proto], &["../proto"])
        .expect("compiling the control API proto (is protoc installed?)");
}
