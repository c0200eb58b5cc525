//! `blk-backend`: a vhost-user-blk server that serves snapshot chains built
//! with the `image-format` crate. Not built yet: see docs/architecture.md.
