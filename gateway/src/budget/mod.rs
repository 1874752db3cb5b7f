//! Token budgets per pod, namespace or model and window. The ledger ([`Ledger`]) admits,
//! draws streamed tokens and settles; with a shared store its limits are leased in
//! slices ([`lease`]), so across G gateways the spend of a window stays within
//! limit + G x slice (docs/budgets.md says what else can pass the line). Keys of budgets
//! scoped per model are bounded ([`keys`]); a restarted gateway seeds its ledger from the
//! stored usage of each window ([`state`]).

mod clock;
mod keys;
pub mod lease;
mod ledger;
mod state;

pub use clock::{Clock, SystemClock};
pub use keys::{MAX_MODEL_KEYS, OTHER_MODELS};
pub use lease::{AdmitError, Ask, Grant, LeaseBackend, LeaseError, LeaseFuture, Measures};
pub use ledger::{Exhausted, Ledger, Refusal, Reservation};
pub use state::{state, BudgetState, Spent};
