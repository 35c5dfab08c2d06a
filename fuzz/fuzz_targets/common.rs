//! Shared by the fuzz targets.

/// libFuzzer's hook aborts on every panic; a panic that the engine contains (a third-party
/// parser's, turned into an error by `loupe_core::error::contain`) is not a crash, so the hook
/// installed here lets it unwind and aborts on every other.
pub fn hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !loupe_core::error::panic_is_contained() {
                fuzzer(info);
                std::process::abort();
            }
        }));
    });
}
