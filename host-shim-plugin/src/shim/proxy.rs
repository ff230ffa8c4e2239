//! The wrapper's data path: every connection from containerd gets its own connection to the
//! delegate shim, and frames flow both ways unchanged (any service, any method, streams and
//! all). Only task `Create` and `Delete` requests are decoded, to run the sandbox hooks; a
//! refusal is answered to containerd in place of the delegate's reply.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api::{CreateTaskRequest, DeleteRequest};
use protobuf::Message;
use slog::{info, warn, Logger};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::shim::frames::Frame;
use crate::shim::sandbox::{After, Sandbox};

const TASK_SERVICE: &str = "containerd.task.v2.Task";

/// Serves containerd until the delegate shim is gone (it exits after `Shutdown`).
pub async fn serve(listener: UnixListener, delegate: PathBuf, sandbox: Arc<Sandbox>, log: Logger) {
    let watch = {
        let delegate = delegate.clone();
        async move {
            // The delegate exits on Shutdown or when it dies; then so do we.
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if UnixStream::connect(&delegate).await.is_err() {
                    return;
                }
            }
        }
    };
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    let (delegate, sandbox, log) = (delegate.clone(), sandbox.clone(), log.clone());
                    tokio::spawn(async move {
                        if let Err(e) = connection(client, &delegate, sandbox, log.clone()).await {
                            warn!(log, "connection ended"; "error" => e.to_string());
                        }
                    });
                }
                Err(e) => warn!(log, "accept failed"; "error" => e.to_string()),
            }
        }
    };
    tokio::select! {
        _ = watch => info!(log, "delegate shim is gone; exiting"),
        _ = accept => {}
    }
}

async fn connection(
    client: UnixStream,
    delegate: &Path,
    sandbox: Arc<Sandbox>,
    log: Logger,
) -> std::io::Result<()> {
    let upstream = UnixStream::connect(delegate).await?;
    let (mut from_client, to_client) = client.into_split();
    let (mut from_delegate, mut to_delegate) = upstream.into_split();
    let to_client = Arc::new(Mutex::new(to_client));
    let pending: Arc<Mutex<HashMap<u32, After>>> = Arc::default();

    let upward = {
        let (to_client, pending, sandbox, log) = (
            to_client.clone(),
            pending.clone(),
            sandbox.clone(),
            log.clone(),
        );
        async move {
            while let Some(frame) = Frame::read(&mut from_client).await? {
                if let Some(req) = frame.request().filter(|r| r.service == TASK_SERVICE) {
                    match req.method.as_str() {
                        "Create" => {
                            let Ok(create) = CreateTaskRequest::parse_from_bytes(&req.payload)
                            else {
                                frame.write(&mut to_delegate).await?;
                                continue;
                            };
                            match sandbox
                                .before_create(&create.id, Path::new(&create.bundle))
                                .await
                            {
                                Ok(None) => {}
                                Ok(Some(after)) => {
                                    pending.lock().await.insert(frame.stream_id, after);
                                }
                                Err(refusal) => {
                                    warn!(log, "Create refused"; "id" => &create.id, "reason" => &refusal.message);
                                    let reply = Frame::error_response(
                                        frame.stream_id,
                                        refusal.code,
                                        &refusal.message,
                                    );
                                    reply.write(&mut *to_client.lock().await).await?;
                                    continue;
                                }
                            }
                        }
                        "Delete" => {
                            if let Ok(del) = DeleteRequest::parse_from_bytes(&req.payload) {
                                if del.exec_id.is_empty() {
                                    sandbox.before_delete(&del.id).await;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                frame.write(&mut to_delegate).await?;
            }
            std::io::Result::Ok(())
        }
    };

    let downward = async move {
        while let Some(frame) = Frame::read(&mut from_delegate).await? {
            let after = match frame.response_code() {
                Some(_) => pending.lock().await.remove(&frame.stream_id),
                None => None,
            };
            match (after, frame.response_code()) {
                (Some(after), Some(ttrpc::Code::OK)) => {
                    // Mount off this loop: other replies keep flowing meanwhile.
                    let (to_client, sandbox, log) =
                        (to_client.clone(), sandbox.clone(), log.clone());
                    tokio::spawn(async move {
                        let reply = match sandbox.after_ok(after).await {
                            Ok(()) => frame,
                            Err(refusal) => {
                                warn!(log, "sandbox Create failed after the VM started"; "reason" => &refusal.message);
                                Frame::error_response(
                                    frame.stream_id,
                                    refusal.code,
                                    &refusal.message,
                                )
                            }
                        };
                        let _ = reply.write(&mut *to_client.lock().await).await;
                    });
                }
                _ => frame.write(&mut *to_client.lock().await).await?,
            }
        }
        std::io::Result::Ok(())
    };

    // Either side closing ends the connection.
    tokio::select! {
        r = upward => r,
        r = downward => r,
    }
}
