//! Helpers shared by the tests that start the `easel` binary.

/// A loopback port nothing listens on (free when asked; the test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}
