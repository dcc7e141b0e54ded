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

/// Texts embedded together (one llama.cpp batch, one sequence each) get the
/// vectors they get alone: sequences do not see each other.
#[test]
fn a_batch_embeds_each_text_as_if_it_were_alone() {
    let mut e = LlamaEmbedder::load(&embed_model_path(), 1).unwrap();
    let texts: Vec<String> = (0..70)
        .map(|i| match i % 4 {
            0 => format!("Recipe number {i}: boil the pasta in salted water."),
            1 => format!("Invoice {i} is due at the end of the month."),
            2 => "short".to_string(),
            _ => format!("{} the end", "a long sentence about the weather in the mountains ".repeat(i % 9 + 1)),
        })
        .collect();
    let together = e.embed_batch(&texts).unwrap();
    assert_eq!(together.len(), texts.len(), "one vector per text, across two batches of at most 64");
    for (i, t) in texts.iter().enumerate() {
        let alone = e.embed(t).unwrap();
        let sim = cosine(&alone, &together[i]);
        assert!(sim > 0.999, "text {i} batched differs from alone: cosine {sim}");
    }
}
