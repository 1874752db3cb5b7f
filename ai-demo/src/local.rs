//! The local demo driver (filled in below).
