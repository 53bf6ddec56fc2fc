//! Pingora 0.9.1 with no hooks at all, proxying to one address: the floor that shiftgate's
//! pass-through overhead is compared against in BENCHMARKS.md.
//!
//! `cargo run --release --example pingora_baseline -- 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM`

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

struct Bare {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen address");
    let upstream = args
        .next()
        .expect("upstream address")
        .parse()
        .expect("IP:PORT");
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen);
    proxy.threads = Some(1);
    server.add_service(proxy);
    server.run_forever()
}
