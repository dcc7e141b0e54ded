//! The converted embedding model reproduces known similarities.

mod common;

use common::embed_model_path;
use modelpool_actors::engine::embed::{cosine, LlamaEmbedder};

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
