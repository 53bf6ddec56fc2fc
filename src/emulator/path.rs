//! Path templates in the emulator's config: the proxy's own [`crate::route::PathTemplate`]
//! (literal segments, `{name}`, a last `**`), read from YAML.

pub use crate::route::PathTemplate;
