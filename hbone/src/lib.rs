//! HBONE: HTTP/2 CONNECT tunnels (Istio's HBONE and the reference's `POST /_hbone/<port>`),
//! server and client. This crate speaks the protocol and knows nothing of GCP or Kubernetes.
//!
//! The protocol code lands with the tunnel issue; the crate exists now so the workspace has
//! its final shape.
