//! A request's sampler chain, and the check that its prompt and reply fit
//! in one sequence.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

use crate::error::EngineError;
use crate::params::SamplingParams;

/// Builds the sampler chain; temperature 0 is greedy. A grammar is a
/// sampler of its own ([`grammar_sampler`], [`sample_constrained`]).
pub fn build_sampler(model: &LlamaModel, p: &SamplingParams, n_ctx: u32) -> LlamaSampler {
    let mut chain = Vec::new();
    let penalised = p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
    // The penalties sampler allocates a ring of this many tokens: never more than the sequence holds.
    let window = p.penalty_window(n_ctx);
    if penalised && window > 0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            window,
            p.repeat_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        ));
    }
    if p.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if p.top_k > 0 {
            chain.push(LlamaSampler::top_k(p.top_k));
        }
        chain.push(LlamaSampler::top_p(p.top_p, 1));
        if p.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(p.min_p, 1));
        }
        chain.push(LlamaSampler::temp(p.temperature));
        let seed = p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
        });
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

/// The grammar sampler of a GBNF text; a grammar llama.cpp cannot parse is
/// the client's error.
pub fn grammar_sampler(model: &LlamaModel, gbnf: &str) -> Result<LlamaSampler, EngineError> {
    LlamaSampler::grammar(model, gbnf, "root").map_err(|e| EngineError::InvalidParam {
        field: "grammar",
        rule: "must be a GBNF grammar llama.cpp can parse, with a rule named root",
        value: format!("{e}: {}", gbnf.chars().take(80).collect::<String>()),
    })
}

/// Samples from logits `idx` under a grammar, as llama.cpp's own server
/// does: the chain picks a token, and the grammar checks that one token
/// alone; only when it refuses does the grammar filter the whole vocabulary
/// and the chain pick again (filtering every token at every step is what
/// makes constrained decoding slow). A grammar failure (llama.cpp throws)
/// ends the sequence with an error instead of the process.
pub fn sample_constrained(
    chain: &mut LlamaSampler,
    grammar: &mut LlamaSampler,
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    idx: i32,
) -> Result<llama_cpp_2::token::LlamaToken, EngineError> {
    use llama_cpp_2::token::data::LlamaTokenData;
    use llama_cpp_2::token::data_array::LlamaTokenDataArray;
    let none_left = || EngineError::Decode("the grammar left no token to choose".into());
    let mut candidates = ctx.token_data_array_ith(idx);
    candidates.apply_sampler(chain);
    let chosen = candidates.selected_token().ok_or_else(none_left)?;
    let logit = candidates.data.iter().find(|d| d.id() == chosen).map_or(0.0, LlamaTokenData::logit);
    let mut alone = LlamaTokenDataArray::new(vec![LlamaTokenData::new(chosen, logit, 0.0)], false);
    alone.apply_sampler(grammar);
    let token = if alone.data[0].logit().is_finite() {
        chosen
    } else {
        let mut candidates = ctx.token_data_array_ith(idx);
        candidates.apply_sampler(grammar);
        candidates.apply_sampler(chain);
        candidates.selected_token().ok_or_else(none_left)?
    };
    grammar
        .try_accept(token)
        .map_err(|e| EngineError::Decode(format!("the grammar could not take the chosen token ({e:?})")))?;
    chain.accept(token);
    Ok(token)
}

/// The log-probability of `token` and of the `top` most likely tokens, from
/// the logits before sampling (a log-softmax over the whole vocabulary).
pub fn token_logprobs(
    model: &LlamaModel,
    logits: &[f32],
    token: llama_cpp_2::token::LlamaToken,
    top: usize,
) -> crate::params::TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    // The `top` largest logits, kept sorted (top is at most 20).
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|(_, b)| *b >= l);
                best.insert(at, (i, l));
                best.truncate(top);
            }
        }
    }
    let text = |t: llama_cpp_2::token::LlamaToken| {
        let mut bytes = Vec::new();
        model.vocab().token_to_piece_into(t, &mut bytes, false, None);
        crate::params::TokenText::new(bytes)
    };
    let chosen = logits.get(token.0 as usize).copied().unwrap_or(f32::NEG_INFINITY);
    crate::params::TokenLogprob {
        token: text(token),
        logprob: chosen - log_sum,
        top: best.into_iter().map(|(i, l)| (text(llama_cpp_2::token::LlamaToken(i as i32)), l - log_sum)).collect(),
    }
}

/// Checks that the prompt plus the requested tokens fit in one sequence,
/// and answers how many tokens it may generate: `max_tokens`, or without
/// one the rest of the context (as llama-server), at least one.
pub fn check_fits(prompt_tokens: u32, max_tokens: Option<u32>, n_ctx: u32) -> Result<u32, EngineError> {
    let wanted = max_tokens.unwrap_or_else(|| n_ctx.saturating_sub(prompt_tokens).max(1));
    let total = prompt_tokens.saturating_add(wanted);
    if total > n_ctx {
        return Err(EngineError::PromptTooLong { prompt_tokens, max_tokens: wanted, total, n_ctx });
    }
    Ok(wanted)
}
