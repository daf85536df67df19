//! stoke-router.
