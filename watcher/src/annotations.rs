//! The names that make up the interface: annotations on pods, the label and annotation
//! on policy ConfigMaps.

/// On a pod: `"true"` attaches the gateway to it.
pub const AI: &str = "kube-gateway.io/ai";
/// On a pod: rewrite every model the pod asks for to this one.
pub const AI_MODEL: &str = "kube-gateway.io/ai-model";
/// On a pod: `"true"` destroys the pod's established connections when the gateway
/// attaches, so keep-alive clients reconnect through it.
pub const NETFLUSH: &str = "kube-gateway.io/netflush";
/// Label on a ConfigMap holding a policy (key [`POLICY_KEY`]).
pub const POLICY_LABEL: &str = "kube-gateway.io/policy";
/// The ConfigMap key of a policy.
pub const POLICY_KEY: &str = "policy.yaml";
/// Annotation on a policy ConfigMap: a label selector of the pods it applies to (none:
/// every annotated pod of its namespace).
pub const SELECTOR: &str = "kube-gateway.io/selector";
/// Suffix of the proof of concept's per-pod ConfigMap (`<pod>-kube-gateway`).
pub const POD_CONFIGMAP_SUFFIX: &str = "-kube-gateway";
/// The key of the proof of concept's per-pod ConfigMap (its JSON format).
pub const POD_CONFIGMAP_KEY: &str = "config";
