//! The converted embedding model reproduces known similarities.

use std::path::PathBuf;

use modelpool_actors::engine::embed::{cosine, LlamaEmbedder};

pub fn embed_model_path() -> PathBuf {
    let path = std::env::var_os("MODELPOOL_TEST_EMBED_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models/all-MiniLM-L6-v2.f16.gguf")
    });
    assert!(path.is_file(), "embedding model {} is missing: run scripts/setup.sh first", path.display());
    path
}

#[test]
fn converted_minilm_reproduces_known_similarities() {
    let mut e = LlamaEmbedder::load(&embed_model_path(), 1).unwrap();
    assert_eq!(e.dim(), 384);
    let pasta = e.embed("How do I cook pasta?").unwrap();
    let noodles = e.embed("Boil the noodles in salted water for about ten minutes.").unwrap();
    let taxes = e.embed("The quarterly tax filing deadline is in April.").unwrap();
    let norm: f32 = pasta.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
    let related = cosine(&pasta, &noodles);
    let unrelated = cosine(&pasta, &taxes);
    println!("related {related:.3}, unrelated {unrelated:.3}");
    assert!((0.50..0.65).contains(&related), "related pair scored {related}");
    assert!(unrelated < 0.15, "unrelated pair scored {unrelated}");
    // Deterministic, and long text is truncated rather than aborting.
    assert_eq!(pasta, e.embed("How do I cook pasta?").unwrap());
    let long = "pasta ".repeat(2000);
    assert_eq!(e.embed(&long).unwrap().len(), 384);
}
