//! Tokenizers: Hugging Face `tokenizer.json` files through the `tokenizers` crate (pure Rust
//! build: `fancy-regex`, no oniguruma), the bos/eos/pad roles that `tokenizer.json` itself does
//! not record, and offline byte-level BPE training.
//!
//! Roles (bos/eos/pad) come, in order of precedence, from an explicit [`Tokenizer::set_bos`] &
//! co., from `tokenizer_config.json` next to `tokenizer.json` ([`Tokenizer::from_dir`]), or from
//! well-known names among the tokenizer's special tokens (see [`BOS_CANDIDATES`] etc.).
//! `tokenizer_config.json` is authoritative when present: `"bos_token": null` means no bos.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Value, json};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

use crate::error::{DataError, Result};
use crate::template::Template;

/// File name of a Hugging Face tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the transformers tokenizer settings (bos/eos/pad names live here).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// File name of a chat template that transformers reads beside `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Names tried, in order, for bos when nothing says which token it is.
pub const BOS_CANDIDATES: &[&str] = &["<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"];
/// Names tried, in order, for eos when nothing says which token it is.
pub const EOS_CANDIDATES: &[&str] = &["<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"];
/// Names tried, in order, for pad when nothing says which token it is.
pub const PAD_CANDIDATES: &[&str] = &["<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"];

/// A token given by its text or by its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    /// The token's text, e.g. `</s>`.
    Name(String),
    /// The token's id.
    Id(u32),
}

impl From<&str> for TokenRef {
    fn from(s: &str) -> Self {
        TokenRef::Name(s.to_string())
    }
}

impl From<String> for TokenRef {
    fn from(s: String) -> Self {
        TokenRef::Name(s)
    }
}

impl From<u32> for TokenRef {
    fn from(id: u32) -> Self {
        TokenRef::Id(id)
    }
}

/// A Hugging Face tokenizer plus its bos/eos/pad roles.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    /// `tokenizer_config.json`'s `add_bos_token` (false when absent): LLaMA-Factory's `stage:
    /// pt` then starts every text (or every packed block) with bos.
    add_bos_token: bool,
    /// Whether the tokenizer comes with a chat template (`tokenizer_config.json`'s
    /// `chat_template` string, or a `chat_template.jinja` file beside it), which
    /// LLaMA-Factory parses when a recipe names no `template`.
    chat_template: bool,
    /// Memo of [`Tokenizer::atomic_token_id`]; `inner` never changes after construction, so
    /// clones may share it.
    atomic_cache: Arc<RwLock<HashMap<String, Option<u32>>>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos.map(|id| (id, self.id_to_token(id))))
            .field("eos", &self.eos.map(|id| (id, self.id_to_token(id))))
            .field("pad", &self.pad.map(|id| (id, self.id_to_token(id))))
            .finish()
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers::Tokenizer`, guessing roles from well-known special-token names.
    pub fn from_hf(inner: tokenizers::Tokenizer) -> Self {
        let mut t = Tokenizer {
            inner,
            bos: None,
            eos: None,
            pad: None,
            add_bos_token: false,
            chat_template: false,
            atomic_cache: Arc::default(),
        };
        t.bos = t.first_special(BOS_CANDIDATES);
        t.eos = t.first_special(EOS_CANDIDATES);
        t.pad = t.first_special(PAD_CANDIDATES);
        t
    }

    /// Loads a `tokenizer.json` file (roles guessed from well-known names; see
    /// [`Tokenizer::from_dir`] to read `tokenizer_config.json` as well).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| DataError::tokenizer(format!("loading {}", path.display()), e))?;
        Ok(Self::from_hf(inner))
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let inner = json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| DataError::tokenizer("parsing tokenizer JSON", e))?;
        Ok(Self::from_hf(inner))
    }

    /// Loads `dir/tokenizer.json` and, when present, takes bos/eos/pad from
    /// `dir/tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`: a string, an
    /// `{"content": ...}` object, or null for none), with `add_bos_token` and whether a chat
    /// template comes with it (there, or as `dir/chat_template.jinja`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut t = Self::from_file(dir.join(TOKENIZER_FILE))?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        if cfg_path.exists() {
            t.apply_tokenizer_config(&cfg_path)?;
        }
        t.chat_template |= dir.join(CHAT_TEMPLATE_FILE).is_file();
        Ok(t)
    }

    /// Sets bos/eos/pad from a `tokenizer_config.json`. Keys that are absent leave the role as
    /// it is; a null value clears it. Also reads `add_bos_token` (a boolean; anything else is
    /// false) and whether `chat_template` holds a template (a string, as transformers'
    /// `tokenizer.chat_template` must be for LLaMA-Factory to parse it).
    pub fn apply_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|cause| DataError::Json {
            path: path.to_path_buf(),
            location: crate::Location::File,
            cause,
        })?;
        let Value::Object(map) = v else {
            return Err(DataError::File {
                path: path.to_path_buf(),
                problem: "expected a JSON object".into(),
            });
        };
        self.add_bos_token = map.get("add_bos_token") == Some(&Value::Bool(true));
        self.chat_template = matches!(map.get("chat_template"), Some(Value::String(_)));
        for (key, role) in [("bos_token", 0), ("eos_token", 1), ("pad_token", 2)] {
            let Some(val) = map.get(key) else { continue };
            let name = match val {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => match o.get("content") {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => {
                        return Err(DataError::Field {
                            path: path.to_path_buf(),
                            location: crate::Location::File,
                            field: format!("{key}.content"),
                            problem: "expected a string".into(),
                        });
                    }
                },
                other => {
                    return Err(DataError::Field {
                        path: path.to_path_buf(),
                        location: crate::Location::File,
                        field: key.to_string(),
                        problem: format!(
                            "expected a string, an object or null, found {}",
                            json_type(other)
                        ),
                    });
                }
            };
            let id = match name {
                None => None,
                Some(n) => Some(self.token_to_id(&n).ok_or_else(|| DataError::Field {
                    path: path.to_path_buf(),
                    location: crate::Location::File,
                    field: key.to_string(),
                    problem: format!("token `{n}` is not in tokenizer.json's vocabulary"),
                })?),
            };
            match role {
                0 => self.bos = id,
                1 => self.eos = id,
                _ => self.pad = id,
            }
        }
        Ok(())
    }

    /// The JSON text of `tokenizer.json`.
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        self.inner
            .to_string(pretty)
            .map_err(|e| DataError::tokenizer("serializing", e))
    }

    /// Writes `tokenizer.json` to `path` (roles are not part of that format: see
    /// [`Tokenizer::save_dir`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_json(true)?;
        std::fs::write(path, json).map_err(|e| DataError::io(path, e))
    }

    /// Writes `dir/tokenizer.json` and a `dir/tokenizer_config.json` holding the roles, in the
    /// form transformers' `AutoTokenizer` reads (`PreTrainedTokenizerFast`).
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        self.save(dir.join(TOKENIZER_FILE))?;
        let name = |id: Option<u32>| id.and_then(|i| self.id_to_token(i));
        let cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "pad_token": name(self.pad),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&cfg).expect("a JSON value serializes");
        std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))
    }

    /// Encodes `text` without adding bos/eos or any post-processing; special tokens written in
    /// the text (e.g. `<|im_start|>`) become their ids. This is what templates use
    /// (`add_special_tokens=False` in transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_impl(text, false)
    }

    /// Encodes `text` with the tokenizer's post-processor (which may add bos, as Llama 3's
    /// `tokenizer.json` does).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_impl(text, true)
    }

    fn encode_impl(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| DataError::tokenizer(format!("encoding {:?}", preview(text)), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; with `skip_special_tokens`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::tokenizer("decoding", e))
    }

    /// The id of a token text (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Embedding rows a model needs: the largest id (model vocabulary and added tokens) + 1.
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// Whether `id` is an added token flagged special (skipped by `decode(.., true)`).
    pub fn is_special_id(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The added special tokens, by id.
    pub fn special_tokens(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        v.sort();
        v
    }

    /// The id of `token` if encoding its text gives exactly that one id (so that a template
    /// writing it inside a string gets the token, not its characters).
    pub fn atomic_token_id(&self, token: &str) -> Option<u32> {
        if let Some(&hit) = self.atomic_cache.read().expect("poisoned").get(token) {
            return hit;
        }
        let found = self
            .token_to_id(token)
            .filter(|&id| matches!(self.encode(token), Ok(ids) if ids == [id]));
        self.atomic_cache
            .write()
            .expect("poisoned")
            .insert(token.to_string(), found);
        found
    }

    /// Resolves a token given by name or id to its id.
    pub fn resolve(&self, token: &TokenRef) -> Result<u32> {
        match token {
            TokenRef::Name(n) => self.token_to_id(n).ok_or_else(|| DataError::MissingToken {
                token: n.clone(),
                needed_by: "the tokenizer settings".into(),
            }),
            TokenRef::Id(id) => match self.id_to_token(*id) {
                Some(_) => Ok(*id),
                None => Err(DataError::UnknownTokenId {
                    id: *id,
                    vocab_size: self.vocab_size(),
                }),
            },
        }
    }

    /// The bos id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The eos id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The pad id, if the tokenizer has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// `tokenizer_config.json`'s `add_bos_token` (transformers' `tokenizer.add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// Sets `add_bos_token`.
    pub fn set_add_bos_token(&mut self, on: bool) {
        self.add_bos_token = on;
    }

    /// Whether the tokenizer has a chat template (see [`Tokenizer::from_dir`]).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template
    }

    /// The pad id, else the eos id (what LLaMA-Factory does when a tokenizer has no pad), else
    /// 0. Padding positions carry label [`crate::IGNORE_INDEX`] and segment 0, so the value
    /// only has to be a valid id.
    pub fn pad_id_or_eos(&self) -> u32 {
        self.pad.or(self.eos).unwrap_or(0)
    }

    /// Sets (or, with `None`, clears) the bos token.
    pub fn set_bos(&mut self, token: Option<TokenRef>) -> Result<()> {
        self.bos = token.map(|t| self.resolve(&t)).transpose()?;
        Ok(())
    }

    /// Sets (or clears) the eos token.
    pub fn set_eos(&mut self, token: Option<TokenRef>) -> Result<()> {
        self.eos = token.map(|t| self.resolve(&t)).transpose()?;
        Ok(())
    }

    /// Sets (or clears) the pad token.
    pub fn set_pad(&mut self, token: Option<TokenRef>) -> Result<()> {
        self.pad = token.map(|t| self.resolve(&t)).transpose()?;
        Ok(())
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn first_special(&self, names: &[&str]) -> Option<u32> {
        names.iter().find_map(|n| {
            let id = self.token_to_id(n)?;
            self.is_special_id(id).then_some(id)
        })
    }
}

/// Settings of [`train_bpe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpeTrainingOptions {
    /// Target vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// A pair is merged only if it occurs at least this often (2, like the Python
    /// `ByteLevelBPETokenizer`).
    pub min_frequency: u64,
    /// Special tokens, given ids `0..n` in this order (bos/eos/pad are added if missing).
    pub special_tokens: Vec<String>,
    /// The bos token's text, if any.
    pub bos_token: Option<String>,
    /// The eos token's text, if any.
    pub eos_token: Option<String>,
    /// The pad token's text, if any (none: padding uses eos).
    pub pad_token: Option<String>,
    /// Split digits into single-digit pre-tokens before byte-level BPE (as LLaMA's
    /// SentencePiece `split_digits`): numbers are then spelled digit by digit, which makes
    /// arithmetic learnable. Default true.
    pub split_digits: bool,
}

impl BpeTrainingOptions {
    /// `vocab_size` with `<s>`/`</s>` as bos/eos, `min_frequency` 2 and digit splitting.
    pub fn new(vocab_size: usize) -> Self {
        BpeTrainingOptions {
            vocab_size,
            min_frequency: 2,
            special_tokens: vec!["<s>".into(), "</s>".into()],
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            pad_token: None,
            split_digits: true,
        }
    }

    /// Options for a tokenizer used with `template`: its special tokens are registered and
    /// bos/eos are the template's natural ones (llama3: `<|begin_of_text|>` /
    /// `<|end_of_text|>`; qwen: no bos, `<|endoftext|>`; alpaca/default/empty: `<s>` / `</s>`).
    pub fn for_template(template: &Template, vocab_size: usize) -> Self {
        let (bos, eos) = template.trained_tokenizer_roles();
        let mut special_tokens: Vec<String> = Vec::new();
        for t in bos.iter().chain(std::iter::once(&eos)) {
            special_tokens.push(t.to_string());
        }
        for t in template.special_tokens() {
            if !special_tokens.iter().any(|s| s == t) {
                special_tokens.push(t.clone());
            }
        }
        BpeTrainingOptions {
            vocab_size,
            min_frequency: 2,
            special_tokens,
            bos_token: bos.map(str::to_string),
            eos_token: Some(eos.to_string()),
            pad_token: None,
            split_digits: true,
        }
    }

    /// Special tokens in id order: `special_tokens`, then bos/eos/pad if not listed.
    fn all_special_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let roles = [&self.bos_token, &self.eos_token, &self.pad_token];
        for t in self
            .special_tokens
            .iter()
            .chain(roles.into_iter().flatten())
        {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }

    fn validate(&self) -> Result<Vec<String>> {
        let specials = self.all_special_tokens();
        if let Some(t) = specials.iter().find(|t| t.is_empty()) {
            return Err(DataError::config(
                "special_tokens",
                format!("empty token {t:?}"),
            ));
        }
        let min = 256 + specials.len();
        if self.vocab_size < min {
            return Err(DataError::config(
                "vocab_size",
                format!(
                    "{} is too small: a byte-level BPE needs 256 byte symbols plus {} special \
                     tokens = {min} at least",
                    self.vocab_size,
                    specials.len()
                ),
            ));
        }
        Ok(specials)
    }
}

type TrainableTokenizer = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

fn new_trainable(opts: &BpeTrainingOptions) -> Result<TrainableTokenizer> {
    let byte_level = ByteLevel::new(false, true, true);
    let pre: PreTokenizerWrapper = if opts.split_digits {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(ByteLevel::new(false, false, true).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(|e| DataError::tokenizer("building the BPE tokenizer", e))
}

fn finish_trained(tk: TrainableTokenizer, opts: &BpeTrainingOptions) -> Result<Tokenizer> {
    let mut t = Tokenizer {
        inner: tk.into(),
        bos: None,
        eos: None,
        pad: None,
        add_bos_token: false,
        chat_template: false,
        atomic_cache: Arc::default(),
    };
    t.set_bos(opts.bos_token.clone().map(TokenRef::Name))?;
    t.set_eos(opts.eos_token.clone().map(TokenRef::Name))?;
    t.set_pad(opts.pad_token.clone().map(TokenRef::Name))?;
    Ok(t)
}

fn new_trainer(
    opts: &BpeTrainingOptions,
    specials: &[String],
) -> tokenizers::models::bpe::BpeTrainer {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build()
}

/// Trains a byte-level BPE tokenizer (ByteLevel pre-tokenizer without prefix space, GPT-2
/// regex, optional digit splitting; ByteLevel decoder) on `texts`. Every byte has a token, so
/// any UTF-8 text encodes and decodes back exactly. Deterministic for a given input.
pub fn train_bpe<I, S>(texts: I, opts: &BpeTrainingOptions) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let specials = opts.validate()?;
    let mut trainer = new_trainer(opts, &specials);
    let mut tk = new_trainable(opts)?;
    tk.train(&mut trainer, texts)
        .map_err(|e| DataError::tokenizer("training BPE", e))?;
    finish_trained(tk, opts)
}

/// [`train_bpe`] on text files, read line by line (line endings kept, as the Python trainer
/// does). A file that cannot be read or is not UTF-8 is an error naming it.
pub fn train_bpe_from_files<P: AsRef<Path>>(
    files: &[P],
    opts: &BpeTrainingOptions,
) -> Result<Tokenizer> {
    let paths: Vec<PathBuf> = files.iter().map(|p| p.as_ref().to_path_buf()).collect();
    if paths.is_empty() {
        return Err(DataError::config("corpus", "no corpus files given"));
    }
    for p in &paths {
        File::open(p).map_err(|e| DataError::io(p, e))?;
    }
    let failure: Arc<Mutex<Option<DataError>>> = Arc::default();
    let lines = FileLines {
        paths: paths.into_iter(),
        current: None,
        failure: Arc::clone(&failure),
    };
    let result = train_bpe(lines, opts);
    if let Some(err) = failure.lock().expect("poisoned").take() {
        return Err(err);
    }
    result
}

/// Lines (with their endings) of several files; the first I/O error is parked in `failure` and
/// ends the iteration.
struct FileLines {
    paths: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, BufReader<File>)>,
    failure: Arc<Mutex<Option<DataError>>>,
}

impl Iterator for FileLines {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.current.is_none() {
                let p = self.paths.next()?;
                match File::open(&p) {
                    Ok(f) => self.current = Some((p, BufReader::new(f))),
                    Err(e) => {
                        *self.failure.lock().expect("poisoned") = Some(DataError::io(p, e));
                        return None;
                    }
                }
            }
            let (path, reader) = self.current.as_mut().expect("set above");
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => self.current = None,
                Ok(_) => return Some(line),
                Err(e) => {
                    *self.failure.lock().expect("poisoned") = Some(DataError::io(path.clone(), e));
                    return None;
                }
            }
        }
    }
}

fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small corpus with words, digits, punctuation and non-ASCII text.
    pub(crate) fn corpus() -> Vec<String> {
        let words = [
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "lazy",
            "dog",
            "what",
            "is",
            "answer",
            "sum",
            "of",
            "numbers",
            "hello",
            "world",
            "données",
            "naïve",
            "日本語",
        ];
        let mut rng = crate::rng::DetRng::new(11);
        (0..400)
            .map(|i| {
                let n = 3 + (i % 9);
                let mut s = String::new();
                for k in 0..n {
                    if k > 0 {
                        s.push(' ');
                    }
                    if rng.below(5) == 0 {
                        s.push_str(&rng.below(100_000).to_string());
                    } else {
                        s.push_str(words[rng.below(words.len() as u64) as usize]);
                    }
                }
                s.push_str(if i % 3 == 0 { "?\n" } else { ".\n" });
                s
            })
            .collect()
    }

    pub(crate) fn small_tokenizer() -> Tokenizer {
        train_bpe(corpus().into_iter(), &BpeTrainingOptions::new(400)).unwrap()
    }

    pub(crate) fn tokenizer_for(template: &Template) -> Tokenizer {
        train_bpe(
            corpus().into_iter(),
            &BpeTrainingOptions::for_template(template, 420),
        )
        .unwrap()
    }

    const SAMPLES: &[&str] = &[
        "",
        "hello world",
        "What is 123 + 4567? 4690",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n",
        "emoji 🦀🚀 👩‍👩‍👧 and flags 🇫🇷",
        "CJK 日本語のテキスト, Ελληνικά, русский, עברית, العربية",
        "never-seen bytes: \u{0}\u{1f}\u{7f}\u{a0}\u{feff}",
        "digits 0123456789 9876543210 3.14159e-10",
        "the quick brown fox",
    ];

    #[test]
    fn trained_bpe_round_trips_arbitrary_utf8() {
        let tok = small_tokenizer();
        for s in SAMPLES {
            let ids = tok.encode(s).unwrap();
            assert_eq!(&tok.decode(&ids, false).unwrap(), s, "ids {ids:?}");
        }
        // Common words got merged: fewer tokens than bytes.
        let ids = tok.encode("the quick brown fox").unwrap();
        assert!(ids.len() < "the quick brown fox".len() / 2, "{ids:?}");
    }

    #[test]
    fn digits_are_split_individually() {
        let tok = small_tokenizer();
        let ids = tok.encode("4690").unwrap();
        assert_eq!(ids.len(), 4);
        let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["4", "6", "9", "0"]);
        let mut opts = BpeTrainingOptions::new(400);
        opts.split_digits = false;
        let tok2 = train_bpe(corpus().into_iter(), &opts).unwrap();
        let s = "digits 0123456789 and 4690";
        assert_eq!(tok2.decode(&tok2.encode(s).unwrap(), false).unwrap(), s);
    }

    #[test]
    fn trained_tokenizer_saves_and_loads_identically() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        for s in SAMPLES {
            let a = tok.encode(s).unwrap();
            assert_eq!(loaded.encode(s).unwrap(), a);
            assert_eq!(&loaded.decode(&a, false).unwrap(), s);
        }
        // Saving again gives the same bytes.
        assert_eq!(loaded.to_json(true).unwrap(), tok.to_json(true).unwrap());
        // Roles were guessed from the well-known names.
        assert_eq!(loaded.bos_id(), tok.token_to_id("<s>"));
        assert_eq!(loaded.eos_id(), tok.token_to_id("</s>"));
        assert_eq!(loaded.pad_id(), None);
        assert_eq!(loaded.pad_id_or_eos(), loaded.eos_id().unwrap());
    }

    #[test]
    fn training_is_deterministic() {
        let a = small_tokenizer().to_json(false).unwrap();
        let b = small_tokenizer().to_json(false).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn training_honours_vocab_size_and_special_ids() {
        let tok = small_tokenizer();
        assert!(tok.vocab_size() <= 400, "{}", tok.vocab_size());
        assert!(tok.vocab_size() > 300, "{}", tok.vocab_size());
        // Special tokens come first, in order.
        assert_eq!(tok.token_to_id("<s>"), Some(0));
        assert_eq!(tok.token_to_id("</s>"), Some(1));
        assert_eq!(
            tok.special_tokens(),
            vec![(0, "<s>".to_string()), (1, "</s>".to_string())]
        );
        assert!(tok.is_special_id(1));
        assert!(!tok.is_special_id(300));
        // Special tokens written in text are single ids; decode can skip them.
        let ids = tok.encode("<s>hello</s>").unwrap();
        assert_eq!(ids.first(), Some(&0));
        assert_eq!(ids.last(), Some(&1));
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<s>hello</s>");
        assert_eq!(tok.atomic_token_id("</s>"), Some(1));
        assert_eq!(tok.atomic_token_id("<|im_start|>"), None);
    }

    #[test]
    fn vocab_too_small_is_an_error() {
        let err = train_bpe(corpus().into_iter(), &BpeTrainingOptions::new(100)).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("vocab_size") && s.contains("258"), "{s}");
    }

    #[test]
    fn roles_by_name_or_id() {
        let mut tok = small_tokenizer();
        tok.set_pad(Some("</s>".into())).unwrap();
        assert_eq!(tok.pad_id(), Some(1));
        tok.set_pad(Some(TokenRef::Id(0))).unwrap();
        assert_eq!(tok.pad_id(), Some(0));
        tok.set_pad(None).unwrap();
        assert_eq!(tok.pad_id(), None);
        let err = tok.set_bos(Some("<|nope|>".into())).unwrap_err();
        assert!(err.to_string().contains("<|nope|>"), "{err}");
        let err = tok.set_eos(Some(TokenRef::Id(1_000_000))).unwrap_err();
        assert!(err.to_string().contains("1000000"), "{err}");
        assert_eq!(tok.resolve(&"</s>".into()).unwrap(), 1);
    }

    #[test]
    fn save_dir_and_from_dir_keep_roles() {
        let mut tok = small_tokenizer();
        tok.set_pad(Some("<s>".into())).unwrap();
        tok.set_bos(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_dir(dir.path()).unwrap();
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["eos_token"], "</s>");
        assert_eq!(cfg["bos_token"], Value::Null);
        let loaded = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(loaded.bos_id(), None); // null in the config wins over the name guess
        assert_eq!(loaded.eos_id(), Some(1));
        assert_eq!(loaded.pad_id(), Some(0));
    }

    #[test]
    fn tokenizer_config_object_form_and_errors() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        tok.save(dir.path().join(TOKENIZER_FILE)).unwrap();
        let cfg = dir.path().join(TOKENIZER_CONFIG_FILE);
        std::fs::write(
            &cfg,
            r#"{"eos_token": {"content": "<s>", "special": true}, "pad_token": "</s>"}"#,
        )
        .unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.eos_id(), Some(0));
        assert_eq!(t.pad_id(), Some(1));
        assert_eq!(t.bos_id(), Some(0)); // absent key: the guess stays
        std::fs::write(&cfg, r#"{"eos_token": "<|missing|>"}"#).unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json")
                && err.contains("eos_token")
                && err.contains("<|missing|>"),
            "{err}"
        );
        std::fs::write(&cfg, r#"{"eos_token": 3}"#).unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a number"), "{err}");
    }

    #[test]
    fn loading_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = Tokenizer::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.json"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 12}").unwrap();
        let err = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
    }

    #[test]
    fn train_from_files_matches_iterator_training() {
        let dir = tempfile::tempdir().unwrap();
        let lines = corpus();
        let (a, b) = lines.split_at(150);
        let f1 = dir.path().join("a.txt");
        let f2 = dir.path().join("b.txt");
        std::fs::write(&f1, a.concat()).unwrap();
        std::fs::write(&f2, b.concat()).unwrap();
        let from_files = train_bpe_from_files(&[&f1, &f2], &BpeTrainingOptions::new(400)).unwrap();
        assert_eq!(
            from_files.to_json(false).unwrap(),
            small_tokenizer().to_json(false).unwrap()
        );
        let err = train_bpe_from_files(&[dir.path().join("x.txt")], &BpeTrainingOptions::new(400))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.txt"), "{err}");
        let bin = dir.path().join("bin.txt");
        std::fs::write(&bin, [0xffu8, 0xfe, b'\n']).unwrap();
        let err = train_bpe_from_files(&[&bin], &BpeTrainingOptions::new(400))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bin.txt"), "{err}");
    }

    /// Llama 3's pre-tokenizer (a regex with look-ahead: needs fancy-regex) and post-processor.
    const LLAMA3_PRE_TOKENIZER: &str = r#"{"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"#;

    #[test]
    fn loads_a_llama3_style_tokenizer_json() {
        let t = Template::llama3();
        let trained = tokenizer_for(&t);
        let bos = trained.bos_id().unwrap();
        let mut v: Value = serde_json::from_str(&trained.to_json(false).unwrap()).unwrap();
        v["pre_tokenizer"] = serde_json::from_str(LLAMA3_PRE_TOKENIZER).unwrap();
        v["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {
                "id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}
        });
        let tok = Tokenizer::from_json_str(&v.to_string()).unwrap();
        // Roles guessed from Llama 3's names.
        assert_eq!(tok.bos_id(), Some(bos));
        assert_eq!(tok.eos_id(), tok.token_to_id("<|end_of_text|>"));
        for s in SAMPLES {
            let ids = tok.encode(s).unwrap();
            assert_eq!(&tok.decode(&ids, false).unwrap(), s);
            let with = tok.encode_with_special_tokens(s).unwrap();
            assert_eq!(with[0], bos);
            assert_eq!(&with[1..], ids.as_slice());
        }
        // The template works on it unchanged.
        let conv = crate::dataset::Conversation::single("hi", "yo");
        let e = t
            .encode_supervised(&tok, &conv, &crate::template::SupervisedOptions::new(64))
            .unwrap();
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
        );
    }

    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<Template>();
        check::<crate::sampler::Sampler>();
        check::<crate::batch::Sample>();
        check::<DataError>();
    }

    #[test]
    fn template_options_register_template_tokens() {
        let t = Template::by_name("llama3").unwrap();
        let opts = BpeTrainingOptions::for_template(&t, 420);
        assert_eq!(opts.bos_token.as_deref(), Some("<|begin_of_text|>"));
        assert_eq!(opts.eos_token.as_deref(), Some("<|end_of_text|>"));
        for tok in ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] {
            assert!(opts.special_tokens.iter().any(|s| s == tok), "{tok}");
        }
        let tok = tokenizer_for(&t);
        for s in SAMPLES {
            assert_eq!(&tok.decode(&tok.encode(s).unwrap(), false).unwrap(), s);
        }
        assert!(tok.atomic_token_id("<|eot_id|>").is_some());
    }
}
