//! The server inside the test's own process, for tests that look into it
//! (its local CA, its certificate index) or need its exact wiring: the
//! library's `Server::new` and `Server::run` on listeners the test bound,
//! until `stop`. One harness for every such test file (tests/https.rs,
//! tests/acme.rs, tests/h2.rs); tests that only talk to the server run the
//! binary instead (`common::ServeProc`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mtasts::config::Config;
use mtasts::server::Server;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct InProcess {
    pub server: Arc<Server>,
    pub https: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// Builds the server for `cfg` (off the async threads: it reads and
    /// writes `state_dir`) and runs it on `https` and `http`, and on
    /// `admin` with its router when given.
    pub async fn start(
        cfg: Config,
        https: TcpListener,
        http: TcpListener,
        admin: Option<(TcpListener, axum::Router)>,
    ) -> InProcess {
        super::init_crypto();
        let server = tokio::task::spawn_blocking(move || Server::new(&cfg))
            .await
            .expect("join")
            .expect("server setup");
        let server = Arc::new(server);
        let (https_addr, http_addr) = (
            https.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&server).run(https, http, admin, async {
            let _ = rx.await;
        }));
        InProcess {
            server,
            https: https_addr,
            http: http_addr,
            stop: Some(tx),
            task,
        }
    }

    /// Asks the server to stop (its graceful shutdown begins); `stop` or
    /// `stop_within` waits for the end.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server and waits (at most 30 s) for its graceful end; its
    /// own result.
    pub async fn stop(self) -> std::io::Result<()> {
        self.stop_within(Duration::from_secs(30)).await
    }

    /// [`InProcess::stop`], failing the test unless the server is gone
    /// within `limit`.
    pub async fn stop_within(mut self, limit: Duration) -> std::io::Result<()> {
        self.begin_stop();
        tokio::time::timeout(limit, &mut self.task)
            .await
            .expect("server stops")
            .expect("join")
    }
}
