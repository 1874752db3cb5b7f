//! Guardrails: the request side of a policy ([`request`]) and the response rules on
//! streams and whole answers ([`response`]).

pub mod request;
pub mod response;
