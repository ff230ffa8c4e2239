//! Host side of CNFS: the containerd shim v2 wrapper and `cnfsctl` land here in their own
//! issue. Nothing is implemented yet; the crate exists so the workspace has its final shape.
