//! Config parsing: any text either loads as a config that keeps the validated invariants or
//! is refused with an error; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match wsrouter::Config::parse(text) {
        Ok(config) => {
            assert!(!config.replicas.is_empty(), "a config without replicas was accepted");
            assert!(config.replicas.iter().filter(|r| r.primary).count() <= 1);
            let urls: HashSet<_> = config.replicas.iter().map(|r| r.url.as_str()).collect();
            assert_eq!(urls.len(), config.replicas.len(), "duplicate replica urls accepted");
            assert!(config.replicas.iter().all(|r| r.weight > 0.0 && r.weight.is_finite()));
            assert!(!config.health_check.interval.is_zero());
            assert!(!config.health_check.timeout.is_zero());
            assert!(config.limits.max_sessions <= config.limits.max_connections);
            // What loads must also build a registry.
            let registry = wsrouter::registry::Registry::new(&config);
            assert_eq!(registry.replicas().len(), config.replicas.len());
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
