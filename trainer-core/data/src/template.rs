//! Chat templates and the encoders that turn records into `(input_ids, labels)`.
//!
//! The templates are LLaMA-Factory's (`src/llamafactory/data/template.py`), slot for slot:
//!
//! | name | layout of one exchange |
//! |---|---|
//! | `llama3` | bos `<\|start_header_id\|>system<\|end_header_id\|>\n\n{system}<\|eot_id\|>` `<\|start_header_id\|>user<\|end_header_id\|>\n\n{user}<\|eot_id\|><\|start_header_id\|>assistant<\|end_header_id\|>\n\n` → `{answer}<\|eot_id\|>` |
//! | `qwen` | `<\|im_start\|>system\n{system}<\|im_end\|>\n<\|im_start\|>user\n{user}<\|im_end\|>\n<\|im_start\|>assistant\n` → `{answer}<\|im_end\|>\n`; default system "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." |
//! | `alpaca` | `{system}### Instruction:\n{user}\n\n### Response:\n` → `{answer}` eos `\n\n`; default system "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" |
//! | `default` | `System: {system}` eos `\n` `Human: {user}` eos `\nAssistant:` → `{answer}` eos `\n` |
//! | `empty` | `{system}{user}` → `{answer}` (no eos: generation does not stop by itself) |
//! | `qwen3` | as `qwen`, no default system; a reasoning template (below) |
//! | `qwen3_nothink` | as `qwen`, no default system, no thinking |
//! | `mistral` | bos `[INST] {system}\n\n{user}[/INST]` → ` {answer}` eos (the system block is fused into the first user message, LLaMA-Factory's `Llama2Template`) |
//!
//! Reasoning templates (`qwen3`, LLaMA-Factory's `ReasoningTemplate` with thought words
//! `<think>\n` and `\n</think>\n\n`): an assistant answer with neither `<think>` nor
//! `</think>` in it gets the empty thought `<think>\n\n</think>\n\n` in front; with
//! `enable_thinking` (the default) the empty thought is part of the target and trained on,
//! without it every thought is removed from the answers and the empty thought is appended to
//! the prompt (masked). With `mask_history` (and not `preserve_thinking`) the thoughts of all
//! but the last answer are removed and only the last gets the empty thought.
//!
//! Tools: a conversation's tool list is rendered after the system prompt (in the system block)
//! by the template's tool format ([`crate::tools`]); only the qwen family has one here.
//!
//! The system block is rendered only in the first exchange and only when the system prompt
//! (the record's, else the template's default) is non-empty. `llama3` and `qwen` replace eos
//! by their end-of-turn token (`<|eot_id|>`, `<|im_end|>`), as LLaMA-Factory's `replace_eos`.
//!
//! SFT ([`Template::encode_supervised`]): every exchange `k` is a pair (source = prefix +
//! system + user message, target = assistant message including its end-of-turn token and
//! trailing separator); labels are [`IGNORE_INDEX`] on sources and the token ids on targets
//! ("train on responses only"; every assistant turn is trained). `cutoff_len` truncation is
//! LLaMA-Factory's: exchanges are taken in order while room is left, and each pair that does
//! not fit is cut by `infer_seqlen` ([`infer_seqlen`]), which shares the room between source
//! and target in proportion to their lengths (the *tail* of each part is cut).
//!
//! PT ([`Template::encode_pretrain`]): bos (when the tokenizer's `add_bos_token` is true) +
//! `text` + eos (llama3 appends `<|end_of_text|>`, others the template's eos); packed texts
//! ([`Template::encode_pretrain_for_packing`]) have no bos of their own.

use std::fmt;

use crate::IGNORE_INDEX;
use crate::dataset::{Conversation, Turn};
use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;
use crate::tools::ToolFormat;

/// One piece of a template slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Text; `{{content}}` is replaced by the message. Special tokens written in it (e.g.
    /// `<|im_start|>`) must be atomic tokens of the tokenizer.
    Text(String),
    /// The tokenizer's bos token.
    Bos,
    /// The eos token (the template's end-of-turn token when it replaces eos).
    Eos,
    /// A token by name.
    Token(String),
}

fn text(s: &str) -> Slot {
    Slot::Text(s.to_string())
}

/// Names of the built-in templates.
pub const TEMPLATE_NAMES: &[&str] = &[
    "alpaca",
    "default",
    "empty",
    "llama3",
    "mistral",
    "qwen",
    "qwen3",
    "qwen3_nothink",
];

/// A chat template (LLaMA-Factory's `Template` without tools and multimodal parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// Before the first message (e.g. bos).
    pub format_prefix: Vec<Slot>,
    /// The system block.
    pub format_system: Vec<Slot>,
    /// A user message, including the assistant header that follows it.
    pub format_user: Vec<Slot>,
    /// An assistant message, including its end-of-turn token and separator.
    pub format_assistant: Vec<Slot>,
    /// The system prompt used when a record has none.
    pub default_system: String,
    /// Tokens that end generation (besides eos).
    pub stop_words: Vec<String>,
    /// Whether eos is replaced by `stop_words[0]`.
    pub replace_eos: bool,
    /// Every special token the template mentions (slots and stop words), registered when a
    /// tokenizer is trained for it.
    pub special_tokens: Vec<String>,
    /// The eos appended to `stage: pt` texts, when not the template's eos.
    pub pt_eos_token: Option<String>,
    /// bos of a tokenizer trained for this template.
    pub trained_bos: Option<String>,
    /// eos of a tokenizer trained for this template.
    pub trained_eos: String,
    /// The thought words (opening, closing) of a reasoning template; `None` for others.
    pub thought_words: Option<(String, String)>,
    /// `enable_thinking` (reasoning templates; LLaMA-Factory's default `true`).
    pub enable_thinking: bool,
    /// `preserve_thinking` (reasoning templates; default `false`).
    pub preserve_thinking: bool,
    /// The system block goes in front of the first user message, inside its markup
    /// (LLaMA-Factory's `Llama2Template`); `format_system` must then be text only.
    pub system_in_user: bool,
    /// How tool lists are rendered into the system block; `None`: tools are refused.
    pub tool_format: Option<ToolFormat>,
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Options of [`Template::encode_supervised`] (LLaMA-Factory's data arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisedOptions {
    /// Maximum tokens of a sample.
    pub cutoff_len: usize,
    /// Also train on prompt tokens (labels = ids everywhere).
    pub train_on_prompt: bool,
    /// Train on the last assistant turn only (earlier ones masked); truncation then keeps the
    /// last turns first.
    pub mask_history: bool,
}

impl SupervisedOptions {
    /// `cutoff_len` with the defaults (responses only, every turn trained).
    pub fn new(cutoff_len: usize) -> Self {
        SupervisedOptions {
            cutoff_len,
            train_on_prompt: false,
            mask_history: false,
        }
    }
}

/// An encoded sample before packing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` ([`IGNORE_INDEX`] where no loss).
    pub labels: Vec<i64>,
    /// Whether `cutoff_len` removed tokens.
    pub truncated: bool,
}

impl Encoded {
    /// Positions that contribute to the loss once labels are shifted: labels other than
    /// [`IGNORE_INDEX`] at positions ≥ 1.
    pub fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// LLaMA-Factory's `infer_seqlen`: how many source and target tokens of a pair to keep in
/// `cutoff_len` tokens. A short target (`2·target < cutoff`) is kept and the source cut; else a
/// short source is kept and the target cut; else both are cut in proportion to their lengths.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff_len: usize) -> (usize, usize) {
    let max_target_len = if target_len * 2 < cutoff_len {
        cutoff_len
    } else if source_len * 2 < cutoff_len {
        cutoff_len - source_len
    } else {
        (cutoff_len as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize
    };
    let new_target_len = max_target_len.min(target_len);
    let max_source_len = cutoff_len.saturating_sub(new_target_len);
    let new_source_len = max_source_len.min(source_len);
    (new_source_len, new_target_len)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    User,
    Assistant,
}

impl Template {
    /// A built-in template by name ([`TEMPLATE_NAMES`]).
    pub fn by_name(name: &str) -> Result<Template> {
        match name {
            "llama3" => Ok(Self::llama3()),
            "qwen" => Ok(Self::qwen()),
            "alpaca" => Ok(Self::alpaca()),
            "default" => Ok(Self::default_template()),
            "empty" => Ok(Self::empty()),
            "qwen3" => Ok(Self::qwen3()),
            "qwen3_nothink" => Ok(Self::qwen3_nothink()),
            "mistral" => Ok(Self::mistral()),
            _ => Err(DataError::UnknownName {
                kind: "template",
                name: name.to_string(),
                known: TEMPLATE_NAMES.join(", "),
            }),
        }
    }

    /// The fields most templates share (no markup; completed by each constructor).
    fn plain() -> Template {
        Template {
            name: String::new(),
            format_prefix: vec![],
            format_system: vec![],
            format_user: vec![],
            format_assistant: vec![],
            default_system: String::new(),
            stop_words: vec![],
            replace_eos: false,
            special_tokens: vec![],
            pt_eos_token: None,
            trained_bos: None,
            trained_eos: String::new(),
            thought_words: None,
            enable_thinking: true,
            preserve_thinking: false,
            system_in_user: false,
            tool_format: None,
        }
    }

    /// Qwen3 (LLaMA-Factory's `qwen3`): ChatML without default system, a reasoning template.
    pub fn qwen3() -> Template {
        let mut t = Template {
            name: "qwen3".into(),
            default_system: String::new(),
            thought_words: Some(("<think>\n".into(), "\n</think>\n\n".into())),
            ..Self::qwen()
        };
        t.special_tokens
            .extend(["<think>".to_string(), "</think>".to_string()]);
        t
    }

    /// Qwen3 without thinking (LLaMA-Factory's `qwen3_nothink`, e.g. for Qwen3 Instruct-2507):
    /// ChatML without default system, no thought handling.
    pub fn qwen3_nothink() -> Template {
        Template {
            name: "qwen3_nothink".into(),
            default_system: String::new(),
            ..Self::qwen()
        }
    }

    /// Mistral (LLaMA-Factory's `mistral`): `[INST]` markup written as text (a tokenizer that
    /// has `[INST]` as a token encodes it as one), the system prompt fused into the first user
    /// message.
    pub fn mistral() -> Template {
        Template {
            name: "mistral".into(),
            format_prefix: vec![Slot::Bos],
            format_system: vec![text("{{content}}\n\n")],
            format_user: vec![text("[INST] {{content}}[/INST]")],
            format_assistant: vec![text(" {{content}}"), Slot::Eos],
            system_in_user: true,
            trained_bos: Some("<s>".into()),
            trained_eos: "</s>".into(),
            ..Self::plain()
        }
    }

    /// Whether the template renders tool lists (else a record with tools is refused).
    pub fn renders_tools(&self) -> bool {
        self.tool_format.is_some()
    }

    /// Llama 3 (Instruct).
    pub fn llama3() -> Template {
        Template {
            name: "llama3".into(),
            format_prefix: vec![Slot::Bos],
            format_system: vec![text(
                "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
            )],
            format_user: vec![text(
                "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n",
            )],
            format_assistant: vec![text("{{content}}<|eot_id|>")],
            default_system: String::new(),
            stop_words: vec!["<|eot_id|>".into(), "<|eom_id|>".into()],
            replace_eos: true,
            special_tokens: vec![
                "<|start_header_id|>".into(),
                "<|end_header_id|>".into(),
                "<|eot_id|>".into(),
                "<|eom_id|>".into(),
            ],
            pt_eos_token: Some("<|end_of_text|>".into()),
            trained_bos: Some("<|begin_of_text|>".into()),
            trained_eos: "<|end_of_text|>".into(),
            ..Self::plain()
        }
    }

    /// Qwen (ChatML).
    pub fn qwen() -> Template {
        Template {
            name: "qwen".into(),
            format_prefix: vec![],
            format_system: vec![text("<|im_start|>system\n{{content}}<|im_end|>\n")],
            format_user: vec![text(
                "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
            )],
            format_assistant: vec![text("{{content}}<|im_end|>\n")],
            default_system: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                .into(),
            stop_words: vec!["<|im_end|>".into()],
            replace_eos: true,
            special_tokens: vec!["<|im_start|>".into(), "<|im_end|>".into()],
            pt_eos_token: None,
            trained_bos: None,
            trained_eos: "<|endoftext|>".into(),
            tool_format: Some(ToolFormat::Qwen),
            ..Self::plain()
        }
    }

    /// Stanford Alpaca.
    pub fn alpaca() -> Template {
        Template {
            name: "alpaca".into(),
            format_prefix: vec![],
            format_system: vec![text("{{content}}")],
            format_user: vec![text("### Instruction:\n{{content}}\n\n### Response:\n")],
            format_assistant: vec![text("{{content}}"), Slot::Eos, text("\n\n")],
            default_system: "Below is an instruction that describes a task. Write a response \
                             that appropriately completes the request.\n\n"
                .into(),
            stop_words: vec![],
            replace_eos: false,
            special_tokens: vec![],
            pt_eos_token: None,
            trained_bos: Some("<s>".into()),
            trained_eos: "</s>".into(),
            ..Self::plain()
        }
    }

    /// LLaMA-Factory's `default` (Human/Assistant).
    pub fn default_template() -> Template {
        Template {
            name: "default".into(),
            format_prefix: vec![],
            format_system: vec![text("System: {{content}}"), Slot::Eos, text("\n")],
            format_user: vec![text("Human: {{content}}"), Slot::Eos, text("\nAssistant:")],
            format_assistant: vec![text("{{content}}"), Slot::Eos, text("\n")],
            default_system: String::new(),
            stop_words: vec![],
            replace_eos: false,
            special_tokens: vec![],
            pt_eos_token: None,
            trained_bos: Some("<s>".into()),
            trained_eos: "</s>".into(),
            ..Self::plain()
        }
    }

    /// Raw concatenation, no markup.
    pub fn empty() -> Template {
        Template {
            name: "empty".into(),
            format_prefix: vec![],
            format_system: vec![text("{{content}}")],
            format_user: vec![text("{{content}}")],
            format_assistant: vec![text("{{content}}")],
            default_system: String::new(),
            stop_words: vec![],
            replace_eos: false,
            special_tokens: vec![],
            pt_eos_token: None,
            trained_bos: Some("<s>".into()),
            trained_eos: "</s>".into(),
            ..Self::plain()
        }
    }

    /// The literal markup of the template (`Human: `, `\nAssistant:`, ...), split at
    /// `{{content}}` and with special tokens left out: text a tokenizer trained for this
    /// template should see, so that the markup costs few tokens.
    pub fn markup_texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for slots in [
            &self.format_prefix,
            &self.format_system,
            &self.format_user,
            &self.format_assistant,
        ] {
            for slot in slots {
                if let Slot::Text(t) = slot {
                    let mut rest = t.as_str();
                    for special in &self.special_tokens {
                        rest = rest.trim_start_matches(special.as_str());
                    }
                    for part in rest.split("{{content}}") {
                        let mut p = part.to_string();
                        for special in &self.special_tokens {
                            p = p.replace(special.as_str(), "");
                        }
                        if !p.trim().is_empty() {
                            out.push(p);
                        }
                    }
                }
            }
        }
        out
    }

    /// Every special token the template mentions.
    pub fn special_tokens(&self) -> &[String] {
        &self.special_tokens
    }

    /// (bos, eos) of a tokenizer trained for this template.
    pub fn trained_tokenizer_roles(&self) -> (Option<&str>, &str) {
        (self.trained_bos.as_deref(), &self.trained_eos)
    }

    fn all_slots(&self) -> impl Iterator<Item = &Slot> {
        self.format_prefix
            .iter()
            .chain(&self.format_system)
            .chain(&self.format_user)
            .chain(&self.format_assistant)
    }

    fn needed_by(&self) -> String {
        format!("template `{}`", self.name)
    }

    fn atomic(&self, tok: &Tokenizer, token: &str) -> Result<u32> {
        tok.atomic_token_id(token)
            .ok_or_else(|| DataError::MissingToken {
                token: token.to_string(),
                needed_by: self.needed_by(),
            })
    }

    /// Checks that `tok` has everything the template writes: its special tokens as atomic
    /// tokens, bos if the template starts with it, eos if it uses it.
    pub fn check_tokenizer(&self, tok: &Tokenizer) -> Result<()> {
        for t in &self.special_tokens {
            let used = self
                .all_slots()
                .any(|s| matches!(s, Slot::Text(x) if x.contains(t.as_str())));
            if used {
                self.atomic(tok, t)?;
            }
        }
        for s in self.all_slots() {
            match s {
                Slot::Bos => {
                    self.bos_id(tok)?;
                }
                Slot::Eos => {
                    self.eos_id(tok)?;
                }
                Slot::Token(t) => {
                    self.atomic(tok, t)?;
                }
                Slot::Text(_) => {}
            }
        }
        if self.replace_eos {
            self.eos_id(tok)?;
        }
        Ok(())
    }

    fn bos_id(&self, tok: &Tokenizer) -> Result<u32> {
        tok.bos_id().ok_or_else(|| DataError::MissingRoleToken {
            role: "bos",
            needed_by: self.needed_by(),
        })
    }

    /// The eos id of this template: its end-of-turn token when it replaces eos (llama3:
    /// `<|eot_id|>`, qwen: `<|im_end|>`), else the tokenizer's eos.
    pub fn eos_id(&self, tok: &Tokenizer) -> Result<u32> {
        match (self.replace_eos, self.stop_words.first()) {
            (true, Some(w)) => self.atomic(tok, w),
            _ => tok.eos_id().ok_or_else(|| DataError::MissingRoleToken {
                role: "eos",
                needed_by: self.needed_by(),
            }),
        }
    }

    /// The eos appended to `stage: pt` texts (llama3: `<|end_of_text|>`; else [`Self::eos_id`]).
    pub fn pt_eos_id(&self, tok: &Tokenizer) -> Result<u32> {
        match &self.pt_eos_token {
            Some(t) => self.atomic(tok, t),
            None => self.eos_id(tok),
        }
    }

    /// Ids that end generation: the template's eos, the tokenizer's own eos and the stop words
    /// the tokenizer has; sorted, without duplicates.
    pub fn stop_token_ids(&self, tok: &Tokenizer) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id(tok).ok().into_iter().collect();
        ids.extend(tok.eos_id());
        ids.extend(
            self.stop_words
                .iter()
                .filter_map(|w| tok.atomic_token_id(w)),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn encode_slots(&self, tok: &Tokenizer, slots: &[Slot], content: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for s in slots {
            match s {
                Slot::Text(t) => {
                    let t = t.replace("{{content}}", content);
                    if !t.is_empty() {
                        ids.extend(tok.encode(&t)?);
                    }
                }
                Slot::Bos => ids.push(self.bos_id(tok)?),
                Slot::Eos => ids.push(self.eos_id(tok)?),
                Slot::Token(t) => ids.push(self.atomic(tok, t)?),
            }
        }
        Ok(ids)
    }

    /// The text of text-only slots with `content` filled in (the fused system block).
    fn render_text(&self, slots: &[Slot], content: &str) -> Result<String> {
        let mut out = String::new();
        for slot in slots {
            match slot {
                Slot::Text(t) => out.push_str(&t.replace("{{content}}", content)),
                other => {
                    return Err(DataError::config(
                        "template",
                        format!(
                            "template `{}` fuses its system block into the user message, which \
                             needs text slots only, not {other:?}",
                            self.name
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The system prompt followed by the rendered tool list (LLaMA-Factory's
    /// `system + tool_text`), or `None` when there is neither.
    fn system_text(&self, system: Option<&str>, tools: Option<&str>) -> Result<Option<String>> {
        let system = match system {
            Some(s) if !s.is_empty() => s,
            _ => self.default_system.as_str(),
        };
        let tools = tools.filter(|t| !t.is_empty());
        if system.is_empty() && tools.is_none() {
            return Ok(None);
        }
        let tool_text = match (tools, self.tool_format) {
            (None, _) => String::new(),
            (Some(t), Some(f)) => f
                .system_text(t)
                .map_err(|e| DataError::config("tools", e))?,
            (Some(_), None) => {
                return Err(DataError::config(
                    "template",
                    format!(
                        "template `{}` has no tool format; tools are rendered by qwen, qwen3 and \
                         qwen3_nothink",
                        self.name
                    ),
                ));
            }
        };
        Ok(Some(format!("{system}{tool_text}")))
    }

    /// LLaMA-Factory's `Template._encode`: one id list per message, the first carrying the
    /// prefix and the system block (with the tools).
    fn encode_messages(
        &self,
        tok: &Tokenizer,
        system: Option<&str>,
        tools: Option<&str>,
        messages: &[(Role, &str)],
    ) -> Result<Vec<Vec<u32>>> {
        // Without this, a tokenizer lacking e.g. `<|im_start|>` would silently spell it out.
        self.check_tokenizer(tok)?;
        let system = self.system_text(system, tools)?;
        let mut out = Vec::with_capacity(messages.len());
        for (i, (role, content)) in messages.iter().enumerate() {
            let mut ids = Vec::new();
            let mut fused = String::new();
            if i == 0 {
                ids.extend(self.encode_slots(tok, &self.format_prefix, "")?);
                if let Some(system) = &system {
                    if self.system_in_user {
                        fused = self.render_text(&self.format_system, system)?;
                    } else {
                        ids.extend(self.encode_slots(tok, &self.format_system, system)?);
                    }
                }
            }
            match role {
                Role::User if !fused.is_empty() => {
                    ids.extend(self.encode_slots(tok, &self.format_user, &(fused + content))?)
                }
                Role::User => ids.extend(self.encode_slots(tok, &self.format_user, content)?),
                Role::Assistant => {
                    ids.extend(self.encode_slots(tok, &self.format_assistant, content)?)
                }
            }
            out.push(ids);
        }
        Ok(out)
    }

    /// The empty thought of a reasoning template (`<think>\n\n</think>\n\n` for qwen3).
    fn empty_thought(&self) -> Option<String> {
        self.thought_words
            .as_ref()
            .map(|(open, close)| format!("{open}{close}"))
    }

    /// LLaMA-Factory's `remove_thought`: every `open…close` span removed (shortest match),
    /// then leading newlines.
    fn remove_thought(&self, content: &str) -> String {
        let Some((open, close)) = &self.thought_words else {
            return content.to_string();
        };
        let mut out = String::new();
        let mut rest = content;
        while let Some(a) = rest.find(open.as_str()) {
            let after = &rest[a + open.len()..];
            let Some(b) = after.find(close.as_str()) else {
                break;
            };
            out.push_str(&rest[..a]);
            rest = &after[b + close.len()..];
        }
        out.push_str(rest);
        out.trim_start_matches('\n').to_string()
    }

    /// One `(source_ids, target_ids)` pair per turn (LLaMA-Factory's `encode_multiturn`).
    pub fn encode_multiturn(
        &self,
        tok: &Tokenizer,
        conv: &Conversation,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        self.encode_pairs(tok, conv, false)
    }

    /// [`Self::encode_multiturn`]; `discard_history_cot` is LLaMA-Factory's
    /// `discarding_history_cot` (reasoning templates: only the last answer keeps its thought
    /// and gets the empty one).
    fn encode_pairs(
        &self,
        tok: &Tokenizer,
        conv: &Conversation,
        discard_history_cot: bool,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let reasoning = self.thought_words.is_some();
        let n = conv.turns.len();
        let answers: Vec<String> = conv
            .turns
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let strip =
                    reasoning && (!self.enable_thinking || (discard_history_cot && k + 1 < n));
                if strip {
                    self.remove_thought(&t.assistant)
                } else {
                    t.assistant.clone()
                }
            })
            .collect();
        let messages: Vec<(Role, &str)> = conv
            .turns
            .iter()
            .zip(&answers)
            .flat_map(|(t, a)| [(Role::User, t.user.as_str()), (Role::Assistant, a.as_str())])
            .collect();
        let mut enc = self
            .encode_messages(
                tok,
                conv.system.as_deref(),
                conv.tools.as_deref(),
                &messages,
            )?
            .into_iter();
        let mut pairs = Vec::with_capacity(n);
        while let (Some(s), Some(t)) = (enc.next(), enc.next()) {
            pairs.push((s, t));
        }
        if let (Some((open, close)), Some(empty)) = (&self.thought_words, self.empty_thought()) {
            let thought = tok.encode(&empty)?;
            let first = if discard_history_cot {
                n.saturating_sub(1)
            } else {
                0
            };
            for k in first..n {
                let a = &answers[k];
                if a.contains(open.trim()) || a.contains(close.trim()) {
                    continue;
                }
                let (source, target) = &mut pairs[k];
                if self.enable_thinking {
                    target.splice(0..0, thought.iter().copied());
                } else {
                    source.extend_from_slice(&thought);
                }
            }
        }
        Ok(pairs)
    }

    /// Encodes a conversation for SFT (see the module docs). A conversation without turns
    /// gives an empty sample.
    pub fn encode_supervised(
        &self,
        tok: &Tokenizer,
        conv: &Conversation,
        opts: &SupervisedOptions,
    ) -> Result<Encoded> {
        let discard_history_cot = opts.mask_history && !self.preserve_thinking;
        let mut pairs = self.encode_pairs(tok, conv, discard_history_cot)?;
        if opts.mask_history {
            pairs.reverse(); // the last turns have priority
        }
        let n_pairs = pairs.len();
        let mut out = Encoded::default();
        let mut total = 0usize;
        // With mask_history the pieces are collected last-turn first and prepended at the end.
        let mut pieces: Vec<(Vec<u32>, Vec<i64>)> = Vec::with_capacity(n_pairs);
        for (turn_idx, (source, target)) in pairs.into_iter().enumerate() {
            if total >= opts.cutoff_len {
                out.truncated = true;
                break;
            }
            let (sl, tl) = infer_seqlen(source.len(), target.len(), opts.cutoff_len - total);
            if sl < source.len() || tl < target.len() {
                out.truncated = true;
            }
            total += sl + tl;
            let source = &source[..sl];
            let target = &target[..tl];
            let source_labels: Vec<i64> = if opts.train_on_prompt {
                source.iter().map(|&i| i64::from(i)).collect()
            } else {
                vec![IGNORE_INDEX; sl]
            };
            let target_labels: Vec<i64> = if opts.mask_history && turn_idx != 0 {
                vec![IGNORE_INDEX; tl]
            } else {
                target.iter().map(|&i| i64::from(i)).collect()
            };
            let mut ids = source.to_vec();
            ids.extend_from_slice(target);
            let mut labels = source_labels;
            labels.extend(target_labels);
            pieces.push((ids, labels));
        }
        if opts.mask_history {
            pieces.reverse();
        }
        for (ids, labels) in pieces {
            out.input_ids.extend(ids);
            out.labels.extend(labels);
        }
        Ok(out)
    }

    /// Encodes a `stage: pt` text as an unpacked row, as LLaMA-Factory's
    /// `PretrainDatasetProcessor` does without packing: bos when the tokenizer's
    /// `add_bos_token` is true, the text, the pt eos; no truncation (the caller keeps the first
    /// `cutoff_len` ids).
    pub fn encode_pretrain(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.pt_bos_id(tok)?.into_iter().collect();
        ids.extend(self.encode_pretrain_for_packing(tok, text)?);
        Ok(ids)
    }

    /// Encodes a `stage: pt` text for packing: the text and the pt eos, no bos
    /// (LLaMA-Factory writes bos over the first id of every packed block instead).
    pub fn encode_pretrain_for_packing(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids = tok.encode(text)?;
        ids.push(self.pt_eos_id(tok)?);
        Ok(ids)
    }

    /// The bos that `stage: pt` writes: the tokenizer's bos when its `add_bos_token` is true
    /// (an error when it has none), else none.
    pub fn pt_bos_id(&self, tok: &Tokenizer) -> Result<Option<u32>> {
        if tok.add_bos_token() {
            self.bos_id(tok).map(Some)
        } else {
            Ok(None)
        }
    }

    /// LLaMA-Factory's pad id once `fix_special_tokens` has run: the tokenizer's pad, else the
    /// template's eos (it sets `pad_token = eos_token` after replacing eos).
    pub fn pad_id(&self, tok: &Tokenizer) -> Option<u32> {
        tok.pad_id().or_else(|| self.eos_id(tok).ok())
    }

    /// The prompt ids for generating the answer to `query` after `history`: what precedes the
    /// assistant's message in [`Self::encode_supervised`] (assistant header included).
    pub fn encode_generation_prompt(
        &self,
        tok: &Tokenizer,
        system: Option<&str>,
        history: &[Turn],
        query: &str,
    ) -> Result<Vec<u32>> {
        // A reasoning template drops earlier thoughts unless told to preserve them
        // (LLaMA-Factory's `ReasoningTemplate.encode_oneturn`).
        let answers: Vec<String> = history
            .iter()
            .map(|t| {
                if self.preserve_thinking {
                    t.assistant.clone()
                } else {
                    self.remove_thought(&t.assistant)
                }
            })
            .collect();
        let mut messages: Vec<(Role, &str)> = history
            .iter()
            .zip(&answers)
            .flat_map(|(t, a)| [(Role::User, t.user.as_str()), (Role::Assistant, a.as_str())])
            .collect();
        messages.push((Role::User, query));
        let mut ids: Vec<u32> = self
            .encode_messages(tok, system, None, &messages)?
            .into_iter()
            .flatten()
            .collect();
        // A reasoning template told not to think starts the answer with the empty thought.
        if let Some(empty) = self.empty_thought()
            && !self.enable_thinking
        {
            ids.extend(tok.encode(&empty)?);
        }
        Ok(ids)
    }

    /// The text of generated ids: everything before the first stop token, special tokens
    /// left out.
    pub fn decode_response(&self, tok: &Tokenizer, generated: &[u32]) -> Result<String> {
        let stops = self.stop_token_ids(tok);
        let end = generated
            .iter()
            .position(|id| stops.contains(id))
            .unwrap_or(generated.len());
        tok.decode(&generated[..end], true)
    }
}

impl std::str::FromStr for Template {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        Template::by_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{small_tokenizer, tokenizer_for};

    fn conv2() -> Conversation {
        Conversation {
            system: Some("Be terse.".into()),
            turns: vec![
                Turn::new("What is 2 + 2?", "4"),
                Turn::new("and 3 + 3?", "6 🦀"),
            ],
            tools: None,
        }
    }

    /// Decodes the kept-label positions run by run.
    fn label_runs(tok: &Tokenizer, e: &Encoded) -> Vec<String> {
        let mut runs = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        for (&id, &l) in e.input_ids.iter().zip(&e.labels) {
            if l == IGNORE_INDEX {
                if !cur.is_empty() {
                    runs.push(tok.decode(&cur, false).unwrap());
                    cur.clear();
                }
            } else {
                assert_eq!(l, i64::from(id), "a kept label equals its input id");
                cur.push(id);
            }
        }
        if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
        }
        runs
    }

    fn check_render(t: &Template, want_text: &str, want_runs: &[&str]) {
        let tok = tokenizer_for(t);
        t.check_tokenizer(&tok).unwrap();
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(4096))
            .unwrap();
        assert!(!e.truncated);
        assert_eq!(e.input_ids.len(), e.labels.len());
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            want_text,
            "{}",
            t.name
        );
        assert_eq!(label_runs(&tok, &e), want_runs, "{}", t.name);
    }

    #[test]
    fn llama3_render_and_masks() {
        check_render(
            &Template::llama3(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nand 3 + 3?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n6 🦀<|eot_id|>",
            &["4<|eot_id|>", "6 🦀<|eot_id|>"],
        );
    }

    #[test]
    fn qwen_render_and_masks() {
        check_render(
            &Template::qwen(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3 + 3?<|im_end|>\n\
             <|im_start|>assistant\n6 🦀<|im_end|>\n",
            &["4<|im_end|>\n", "6 🦀<|im_end|>\n"],
        );
    }

    #[test]
    fn alpaca_render_and_masks() {
        check_render(
            &Template::alpaca(),
            "Be terse.### Instruction:\nWhat is 2 + 2?\n\n### Response:\n4</s>\n\n\
             ### Instruction:\nand 3 + 3?\n\n### Response:\n6 🦀</s>\n\n",
            &["4</s>\n\n", "6 🦀</s>\n\n"],
        );
    }

    #[test]
    fn default_render_and_masks() {
        check_render(
            &Template::default_template(),
            "System: Be terse.</s>\nHuman: What is 2 + 2?</s>\nAssistant:4</s>\n\
             Human: and 3 + 3?</s>\nAssistant:6 🦀</s>\n",
            &["4</s>\n", "6 🦀</s>\n"],
        );
    }

    // Expected texts below are LLaMA-Factory's template definitions (template.py) applied by
    // hand to conv2(): `qwen3`, `qwen3_nothink`, `mistral` (Llama2Template fusion), and the
    // ReasoningTemplate rules for answers without a thought.

    #[test]
    fn qwen3_adds_a_trained_empty_thought_by_default() {
        check_render(
            &Template::qwen3(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n\
             <|im_start|>user\nand 3 + 3?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n6 🦀<|im_end|>\n",
            &[
                "<think>\n\n</think>\n\n4<|im_end|>\n",
                "<think>\n\n</think>\n\n6 🦀<|im_end|>\n",
            ],
        );
    }

    #[test]
    fn qwen3_without_thinking_masks_the_empty_thought_and_drops_thoughts() {
        let mut t = Template::qwen3();
        t.enable_thinking = false;
        let mut c = conv2();
        c.system = None;
        c.turns[1].assistant = "<think>\nadd\n</think>\n\n6 🦀".into();
        let tok = tokenizer_for(&t);
        let e = t
            .encode_supervised(&tok, &c, &SupervisedOptions::new(4096))
            .unwrap();
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n\
             <|im_start|>user\nand 3 + 3?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n6 🦀<|im_end|>\n"
        );
        assert_eq!(label_runs(&tok, &e), ["4<|im_end|>\n", "6 🦀<|im_end|>\n"]);
        // With thinking on, an answer that has a thought keeps it and gets no empty one.
        let t = Template::qwen3();
        let e = t
            .encode_supervised(&tok, &c, &SupervisedOptions::new(4096))
            .unwrap();
        assert_eq!(
            label_runs(&tok, &e),
            [
                "<think>\n\n</think>\n\n4<|im_end|>\n",
                "<think>\nadd\n</think>\n\n6 🦀<|im_end|>\n"
            ]
        );
        // mask_history: earlier thoughts are dropped and only the last answer gets the empty
        // one; the generation prompt is then the masked prefix.
        let mut c2 = conv2();
        c2.turns[0].assistant = "<think>\nsum\n</think>\n\n4".into();
        let mut opts = SupervisedOptions::new(4096);
        opts.mask_history = true;
        let e = t.encode_supervised(&tok, &c2, &opts).unwrap();
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\nand 3 + 3?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n6 🦀<|im_end|>\n"
        );
        assert_eq!(
            t.remove_thought("<think>\na\n</think>\n\nx<think>\nb\n</think>\n\ny"),
            "xy"
        );
    }

    #[test]
    fn qwen3_nothink_render_and_masks() {
        check_render(
            &Template::qwen3_nothink(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3 + 3?<|im_end|>\n\
             <|im_start|>assistant\n6 🦀<|im_end|>\n",
            &["4<|im_end|>\n", "6 🦀<|im_end|>\n"],
        );
        // No default system (qwen has one).
        let t = Template::qwen3_nothink();
        let tok = tokenizer_for(&t);
        let e = t
            .encode_supervised(
                &tok,
                &Conversation::single("hi", "yo"),
                &SupervisedOptions::new(99),
            )
            .unwrap();
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        );
        let tok = tokenizer_for(&Template::qwen());
        assert_eq!(
            Template::qwen3().stop_token_ids(&tok),
            Template::qwen().stop_token_ids(&tok)
        );
    }

    #[test]
    fn mistral_fuses_the_system_into_the_first_user_message() {
        check_render(
            &Template::mistral(),
            "<s>[INST] Be terse.\n\nWhat is 2 + 2?[/INST] 4</s>[INST] and 3 + 3?[/INST] 6 🦀</s>",
            &[" 4</s>", " 6 🦀</s>"],
        );
    }

    #[test]
    fn qwen_renders_tools_after_the_system_prompt() {
        let tools = r#"[{"name": "f", "parameters": {}}]"#;
        let tool_text = ToolFormat::Qwen.system_text(tools).unwrap();
        for (t, system) in [
            (
                Template::qwen(),
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            ),
            (Template::qwen3_nothink(), ""),
        ] {
            let tok = tokenizer_for(&t);
            let mut c = Conversation::single("hi", "yo");
            c.tools = Some(tools.into());
            let e = t
                .encode_supervised(&tok, &c, &SupervisedOptions::new(4096))
                .unwrap();
            assert_eq!(
                tok.decode(&e.input_ids, false).unwrap(),
                format!(
                    "<|im_start|>system\n{system}{tool_text}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
                     <|im_start|>assistant\nyo<|im_end|>\n"
                ),
                "{}",
                t.name
            );
        }
        assert!(tool_text.contains(
            "{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {}}}"
        ));
        // A template without a tool format refuses a record with tools.
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let mut c = Conversation::single("hi", "yo");
        c.tools = Some(tools.into());
        let err = t
            .encode_supervised(&tok, &c, &SupervisedOptions::new(99))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("template `llama3` has no tool format"),
            "{err}"
        );
    }

    #[test]
    fn empty_render_and_masks() {
        check_render(
            &Template::empty(),
            "Be terse.What is 2 + 2?4and 3 + 3?6 🦀",
            &["4", "6 🦀"],
        );
    }

    #[test]
    fn default_system_applies_when_record_has_none() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let c = Conversation::single("hi", "yo");
        let e = t
            .encode_supervised(&tok, &c, &SupervisedOptions::new(4096))
            .unwrap();
        assert_eq!(
            tok.decode(&e.input_ids, false).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
             assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        );
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let e = t
            .encode_supervised(&tok, &c, &SupervisedOptions::new(4096))
            .unwrap();
        assert!(
            tok.decode(&e.input_ids, false)
                .unwrap()
                .starts_with("Below is an instruction that describes a task.")
        );
    }

    #[test]
    fn pair_boundaries_match_multiturn_and_labels_match_pairs() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let pairs = t.encode_multiturn(&tok, &conv2()).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].0[0], tok.bos_id().unwrap());
        assert_eq!(
            *pairs[1].1.last().unwrap(),
            tok.token_to_id("<|eot_id|>").unwrap()
        );
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(4096))
            .unwrap();
        let mut ids: Vec<u32> = Vec::new();
        let mut labels: Vec<i64> = Vec::new();
        for (s, tg) in &pairs {
            ids.extend(s);
            ids.extend(tg);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, s.len()));
            labels.extend(tg.iter().map(|&i| i64::from(i)));
        }
        assert_eq!(e.input_ids, ids);
        assert_eq!(e.labels, labels);
        assert_eq!(e.num_targets(), pairs[0].1.len() + pairs[1].1.len());
    }

    #[test]
    fn train_on_prompt_and_mask_history() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let mut o = SupervisedOptions::new(4096);
        o.train_on_prompt = true;
        let e = t.encode_supervised(&tok, &conv2(), &o).unwrap();
        let ids: Vec<i64> = e.input_ids.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(e.labels, ids);
        let mut o = SupervisedOptions::new(4096);
        o.mask_history = true;
        let e = t.encode_supervised(&tok, &conv2(), &o).unwrap();
        let plain = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(4096))
            .unwrap();
        assert_eq!(e.input_ids, plain.input_ids, "same order of tokens");
        assert_eq!(label_runs(&tok, &e), ["6 🦀<|im_end|>\n"]);
    }

    #[test]
    fn infer_seqlen_matches_llama_factory() {
        // Values computed with LLaMA-Factory's Python infer_seqlen.
        assert_eq!(infer_seqlen(10, 3, 8), (5, 3)); // short target: cut the source
        assert_eq!(infer_seqlen(3, 10, 8), (3, 5)); // short source: cut the target
        assert_eq!(infer_seqlen(10, 10, 8), (4, 4)); // both: proportional
        assert_eq!(infer_seqlen(30, 10, 16), (12, 4)); // int(16 * 10/40) = 4
        assert_eq!(infer_seqlen(2, 3, 100), (2, 3)); // fits
        assert_eq!(infer_seqlen(5, 5, 0), (0, 0));
        assert_eq!(infer_seqlen(7, 9, 10), (5, 5)); // int(10 * 9/16) = 5
        for s in 0..20 {
            for tl in 0..20 {
                for c in 0..25 {
                    let (a, b) = infer_seqlen(s, tl, c);
                    assert!(a <= s && b <= tl && a + b <= c);
                    if s + tl <= c {
                        assert_eq!((a, b), (s, tl));
                    }
                }
            }
        }
    }

    #[test]
    fn cutoff_truncates_like_llama_factory() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let pairs = t.encode_multiturn(&tok, &conv2()).unwrap();
        let (s0, t0) = (pairs[0].0.len(), pairs[0].1.len());
        let (s1, t1) = (pairs[1].0.len(), pairs[1].1.len());
        // Room for exactly the first exchange: the second is dropped.
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(s0 + t0))
            .unwrap();
        assert!(e.truncated);
        assert_eq!(e.input_ids.len(), s0 + t0);
        // One token short: the first exchange is cut by infer_seqlen.
        let cut = s0 + t0 - 1;
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(cut))
            .unwrap();
        let (ks, kt) = infer_seqlen(s0, t0, cut);
        assert_eq!(e.input_ids.len(), ks + kt);
        assert_eq!(&e.input_ids[..ks], &pairs[0].0[..ks]);
        assert_eq!(&e.input_ids[ks..], &pairs[0].1[..kt]);
        // Second exchange partially kept.
        let c = s0 + t0 + (s1 + t1) / 2;
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(c))
            .unwrap();
        assert!(e.truncated);
        assert_eq!(e.input_ids.len(), c.min(s0 + t0 + s1 + t1));
        assert!(e.input_ids.len() <= c);
        // Everything fits.
        let e = t
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(s0 + t0 + s1 + t1))
            .unwrap();
        assert!(!e.truncated);
    }

    #[test]
    fn generation_prompt_is_the_masked_prefix() {
        for name in TEMPLATE_NAMES {
            let t = Template::by_name(name).unwrap();
            let tok = tokenizer_for(&t);
            let c = conv2();
            // A reasoning template drops the thoughts of earlier answers at inference, as
            // training does with mask_history.
            let mut opts = SupervisedOptions::new(4096);
            opts.mask_history = t.thought_words.is_some();
            let e = t.encode_supervised(&tok, &c, &opts).unwrap();
            let p = t
                .encode_generation_prompt(
                    &tok,
                    c.system.as_deref(),
                    &c.turns[..1],
                    &c.turns[1].user,
                )
                .unwrap();
            assert_eq!(&e.input_ids[..p.len()], p.as_slice(), "{name}");
            assert_eq!(e.labels[p.len() - 1], IGNORE_INDEX, "{name}");
            assert_ne!(e.labels[p.len()], IGNORE_INDEX, "{name}");
        }
    }

    #[test]
    fn decode_response_stops_at_stop_tokens() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let mut ids = tok.encode("4690").unwrap();
        ids.push(tok.token_to_id("<|eot_id|>").unwrap());
        ids.extend(tok.encode("garbage").unwrap());
        assert_eq!(t.decode_response(&tok, &ids).unwrap(), "4690");
        let stops = t.stop_token_ids(&tok);
        for s in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"] {
            assert!(stops.contains(&tok.token_to_id(s).unwrap()), "{s}");
        }
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let mut ids = tok.encode("12").unwrap();
        ids.push(tok.eos_id().unwrap());
        ids.extend(tok.encode("\n\n### Instruction").unwrap());
        assert_eq!(t.decode_response(&tok, &ids).unwrap(), "12");
        assert_eq!(t.stop_token_ids(&tok), vec![tok.eos_id().unwrap()]);
    }

    #[test]
    fn missing_special_tokens_are_clear_errors() {
        let tok = small_tokenizer(); // only <s>, </s>
        let err = Template::qwen()
            .check_tokenizer(&tok)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`<|im_start|>`") && err.contains("template `qwen`"),
            "{err}"
        );
        let err = Template::llama3()
            .check_tokenizer(&tok)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`<|start_header_id|>`") && err.contains("template `llama3`"),
            "{err}"
        );
        let err = Template::qwen()
            .encode_supervised(&tok, &conv2(), &SupervisedOptions::new(100))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("<|im_end|>") || err.contains("<|im_start|>"),
            "{err}"
        );
        // Templates without special tokens work with any tokenizer that has eos.
        Template::alpaca().check_tokenizer(&tok).unwrap();
        Template::empty().check_tokenizer(&tok).unwrap();
        let mut no_eos = tok.clone();
        no_eos.set_eos(None).unwrap();
        let err = Template::alpaca()
            .check_tokenizer(&no_eos)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("template `alpaca` needs the eos token"),
            "{err}"
        );
        Template::empty().check_tokenizer(&no_eos).unwrap();
        // llama3 needs bos.
        let t = Template::llama3();
        let mut tok3 = tokenizer_for(&t);
        tok3.set_bos(None).unwrap();
        let err = t.check_tokenizer(&tok3).unwrap_err().to_string();
        assert!(err.contains("bos") && err.contains("llama3"), "{err}");
    }

    #[test]
    fn unknown_template_lists_known_ones() {
        let err = Template::by_name("vicuna").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown template `vicuna`; known: alpaca, default, empty, llama3, mistral, qwen, qwen3, \
             qwen3_nothink"
        );
        let t: Template = "qwen".parse().unwrap();
        assert_eq!(t.to_string(), "qwen");
    }

    #[test]
    fn pretrain_appends_the_template_eos() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let ids = t.encode_pretrain(&tok, "hello world").unwrap();
        assert_eq!(
            *ids.last().unwrap(),
            tok.token_to_id("<|end_of_text|>").unwrap()
        );
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "hello world<|end_of_text|>"
        );
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let ids = t.encode_pretrain(&tok, "x").unwrap();
        assert_eq!(*ids.last().unwrap(), tok.token_to_id("<|im_end|>").unwrap());
        let t = Template::empty();
        let tok = tokenizer_for(&t);
        let ids = t.encode_pretrain(&tok, "x").unwrap();
        assert_eq!(*ids.last().unwrap(), tok.eos_id().unwrap());
        assert_eq!(t.pt_bos_id(&tok).unwrap(), None);
    }

    /// LLaMA-Factory's `PretrainDatasetProcessor.preprocess_dataset` without packing:
    /// `bos_token + text + eos_token` when `tokenizer.add_bos_token`; with packing the texts
    /// carry no bos (it is written over each block's first id instead).
    #[test]
    fn pretrain_starts_with_bos_when_the_tokenizer_adds_it() {
        let t = Template::alpaca();
        let mut tok = tokenizer_for(&t);
        tok.set_add_bos_token(true);
        let bos = tok.bos_id().unwrap();
        let eos = tok.eos_id().unwrap();
        let text = tok.encode("hello world").unwrap();
        let ids = t.encode_pretrain(&tok, "hello world").unwrap();
        assert_eq!(ids, [vec![bos], text.clone(), vec![eos]].concat());
        let packed = t.encode_pretrain_for_packing(&tok, "hello world").unwrap();
        assert_eq!(packed, [text, vec![eos]].concat());
        // No bos to write: an error naming it.
        tok.set_bos(None).unwrap();
        let err = t.encode_pretrain(&tok, "x").unwrap_err().to_string();
        assert!(err.contains("bos"), "{err}");
    }
}
