//! An export's listening socket: one frontend connection at a time (the
//! loop is vhost-user-session's, shared with net-backend); after each
//! session the export's writes are flushed.

use std::sync::Arc;

use tracing::warn;
use vhost::vhost_user::Listener;
pub use vhost_user_session::server::StopHandle;

use crate::connection;
use crate::export::Export;

/// Serves `export` on `listener` until `stop` says so.
pub fn serve(export: Arc<Export>, listener: Listener, stop: Arc<StopHandle>) {
    let name = export.spec.socket.display().to_string();
    vhost_user_session::server::serve(
        &name,
        listener,
        &stop,
        |session| connection::connect(&export, session),
        || {
            if let Err(e) = export.flush() {
                warn!(socket = %name, "flush after the session: {e}");
            }
        },
    );
}
