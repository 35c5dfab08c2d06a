//! Each family's config files as published and as re-saved by transformers 5.23
//! (tests/fixtures/configs/, tools/make_config_fixtures.py) read to the same values.

use std::path::PathBuf;

use loupe_core::load::config::{GenerationConfig, PreprocessorConfig, Qwen2VlConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs")
}

#[test]
fn published_and_resaved_files_read_the_same() {
    let mut families = 0;
    let mut generation = 0;
    for family in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"] {
        let (p, r) = (
            dir().join(family).join("published"),
            dir().join(family).join("resaved"),
        );
        let a = Qwen2VlConfig::from_file(&p.join("config.json")).unwrap();
        let b = Qwen2VlConfig::from_file(&r.join("config.json"))
            .unwrap_or_else(|e| panic!("{family}: the re-saved config.json: {e}"));
        // Every field, by its debug form (the structs hold floats, so no Eq).
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{family}: config.json");
        assert_eq!(a.model_type, family);
        let a = PreprocessorConfig::from_file(&p.join("preprocessor_config.json")).unwrap();
        let b = PreprocessorConfig::from_file(&r.join("preprocessor_config.json")).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{family}: preprocessor");
        assert_eq!((a.min_pixels, a.max_pixels), (3136, 40000), "{family}");
        if p.join("generation_config.json").is_file() {
            let a = GenerationConfig::from_file(&p.join("generation_config.json")).unwrap();
            let b = GenerationConfig::from_file(&r.join("generation_config.json")).unwrap();
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{family}: generation");
            assert_eq!(a.eos_token_id, [422, 420]);
            generation += 1;
        }
        families += 1;
    }
    assert_eq!((families, generation), (4, 2));
}
