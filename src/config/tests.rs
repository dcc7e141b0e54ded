//! Configuration layers, checks and the remote entries.
use super::*;

fn load(o: &Overrides, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let model = std::env::var("MODELPOOL_TEST_MODEL").unwrap_or_else(|_| {
        format!("{}/.cache/modelpool/models/SmolLM2-135M-Instruct.Q4_1.gguf", std::env::var("HOME").unwrap())
    });
    let embed = std::env::var("MODELPOOL_TEST_EMBED_MODEL").unwrap_or_else(|_| {
        format!("{}/.cache/modelpool/models/all-MiniLM-L6-v2.Q8_0.gguf", std::env::var("HOME").unwrap())
    });
    let mut vars: Vec<(String, String)> =
        vec![("MODELPOOL_MODEL".into(), model), ("MODELPOOL_EMBEDDING_MODEL".into(), embed)];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load_with_env(o, vars.into_iter())
}

#[test]
fn layers_apply_in_order_default_profile_env_flag() {
    let c = load(&Overrides::default(), &[]).unwrap();
    assert_eq!((c.instances, c.slots, c.acquire_timeout_ms), (1, 4, 30000));
    let small = Overrides { profile: Some("small".into()), ..Default::default() };
    let c = load(&small, &[]).unwrap();
    assert_eq!((c.instances, c.acquire_timeout_ms), (3, 30000));
    let c = load(&small, &[("MODELPOOL_INSTANCES", "4"), ("MODELPOOL_SAMPLING_TEMPERATURE", "0.2")]).unwrap();
    assert_eq!(c.instances, 4);
    assert_eq!(c.sampling.temperature, 0.2);
    let flag = Overrides { instances: Some(5), ..small };
    assert_eq!(load(&flag, &[("MODELPOOL_INSTANCES", "4")]).unwrap().instances, 5);
    let c =
        load(&Overrides::default(), &[("MODELPOOL_SERVER_API_KEYS", "a,b"), ("MODELPOOL_CHAT_DURABILITY", "async")])
            .unwrap();
    assert_eq!(c.server.api_keys, vec!["a", "b"]);
    assert_eq!(c.chat.durability, Durability::Async);
}

#[test]
fn remotes_come_from_the_file_the_environment_and_flags() {
    let dir = tempfile_dir();
    let file = dir.join("remotes.toml");
    std::fs::write(
        &file,
        "instances = 0\n[[remote]]\nurl = \"http://10.0.0.5:8080\"\napi_key = \"s3cret\"\nslots = 2\n",
    )
    .unwrap();
    let o =
        Overrides { config: Some(file.clone()), remotes: vec!["http://10.0.0.7:8080".into()], ..Default::default() };
    let c = load(&o, &[("MODELPOOL_REMOTES", "http://10.0.0.6:8080")]).unwrap();
    let urls: Vec<&str> = c.remote.iter().map(|r| r.url.as_str()).collect();
    assert_eq!(urls, ["http://10.0.0.5:8080", "http://10.0.0.6:8080", "http://10.0.0.7:8080"]);
    assert_eq!((c.instances, c.remote[0].slots, c.remote[1].timeout_ms), (0, Some(2), 30_000));
    assert!(!format!("{:?}", c.remote[0]).contains("s3cret"), "the key never reaches a log");
    let opts = c.pool_options();
    assert_eq!((opts.members(), opts.remotes[0].api_key.as_deref()), (3, Some("s3cret")));

    let err = load(&Overrides { instances: Some(0), ..Default::default() }, &[]).unwrap_err().to_string();
    assert!(err.contains("instances") && err.contains("[[remote]]"), "{err}");
    let bad = Overrides { remotes: vec!["10.0.0.5:8080".into()], ..Default::default() };
    let err = load(&bad, &[]).unwrap_err().to_string();
    assert!(err.contains("remote.url") && err.contains("http://"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modelpool-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn threads_default_to_an_even_split_of_the_cores() {
    let mut c = load(&Overrides::default(), &[]).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    c.instances = 2;
    assert_eq!(c.threads_per_instance(), (cores / 2).max(1));
    c.instances = 64;
    assert_eq!(c.threads_per_instance(), 1);
    c.threads = 3;
    assert_eq!(c.threads_per_instance(), 3);
}

#[test]
fn bad_values_name_the_setting() {
    let err = load(&Overrides::default(), &[("MODELPOOL_N_CTX", "32")]).unwrap_err().to_string();
    assert!(err.contains("n_ctx") && err.contains("32"), "{err}");
    let err =
        load(&Overrides::default(), &[("MODELPOOL_SAMPLING_MAX_TOKENS_DEFAULT", "4096")]).unwrap_err().to_string();
    assert!(err.contains("sampling.max_tokens_default") && err.contains("n_ctx"), "{err}");
    let err = load(&Overrides::default(), &[("MODELPOOL_CHAT_DURABILITY", "sometimes")]).unwrap_err().to_string();
    assert!(err.contains("sometimes") || err.contains("durability"), "{err}");
    let err = load(&Overrides { bind: Some("localhost".into()), ..Default::default() }, &[]).unwrap_err().to_string();
    assert!(err.contains("server.bind") && err.contains("localhost"), "{err}");
    let cross = [("MODELPOOL_SERVER_API_KEYS", "k1,k2"), ("MODELPOOL_CHAT_CROSS_CONVERSATION_RECALL", "true")];
    let err = load(&Overrides::default(), &cross).unwrap_err().to_string();
    assert!(err.contains("server.key_namespaces") && err.contains("cross_conversation_recall"), "{err}");
    let bound = [cross[0], cross[1], ("MODELPOOL_SERVER_KEY_NAMESPACES", "k1=team-a,k2=team-b")];
    let c = load(&Overrides::default(), &bound).unwrap();
    assert_eq!(c.key_namespaces().get("k2").map(String::as_str), Some("team-b"));
    let err =
        load(&Overrides::default(), &[cross[0], ("MODELPOOL_SERVER_KEY_NAMESPACES", "k3=x")]).unwrap_err().to_string();
    assert!(err.contains("server.key_namespaces") && err.contains("not in server.api_keys"), "{err}");
}
