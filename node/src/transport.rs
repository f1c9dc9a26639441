//! Transport: tcp + noise + yamux, with an optional bind address and link shaper hook.
