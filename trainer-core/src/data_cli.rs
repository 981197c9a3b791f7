//! `trainer tokenizer train` and `trainer data addition`: what a demo needs without downloads —
//! a byte-level BPE tokenizer trained on the job's own data, and the quickstart's learnable
//! task (multi-digit addition, with a held-out split).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringmaster_data::dataset::{DatasetFormat, load_records};
use ringmaster_data::synthetic::{AdditionConfig, generate_addition};
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};

/// `trainer tokenizer ...`
#[derive(Parser, Debug)]
#[command(name = "trainer tokenizer", bin_name = "trainer tokenizer")]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on dataset files; writes tokenizer.json and
    /// tokenizer_config.json into --out.
    Train {
        /// Dataset files (.json / .jsonl / .txt).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Dataset format: alpaca, sharegpt, openai or text.
        #[arg(long, default_value = "alpaca")]
        format: String,
        /// Chat template whose special tokens the tokenizer must know.
        #[arg(long, default_value = "llama3")]
        template: String,
        #[arg(long, default_value_t = 512)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        /// Also train on the template's markup (`Human: `, `\nAssistant:`, ...) so that it
        /// costs few tokens.
        #[arg(long)]
        with_template_markup: bool,
    },
}

/// `trainer data ...`
#[derive(Parser, Debug)]
#[command(name = "trainer data", bin_name = "trainer data")]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write the addition task as alpaca JSONL: --out/train.jsonl and --out/eval.jsonl.
    Addition {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1)]
        min_digits: u32,
        #[arg(long, default_value_t = 3)]
        max_digits: u32,
        /// Training records (1 to 10,000,000).
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        train_size: u32,
        /// Held-out records (0 to 10,000,000).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
        eval_size: u32,
    },
}

/// Runs `trainer tokenizer ...`.
///
/// # Errors
/// Unreadable or malformed data, an unknown format or template.
pub fn tokenizer(args: TokenizerArgs) -> anyhow::Result<()> {
    match args.command {
        TokenizerCommand::Train {
            files,
            format,
            template,
            vocab_size,
            out,
            with_template_markup,
        } => {
            let format: DatasetFormat = format
                .parse()
                .map_err(|e| anyhow::anyhow!("--format: {e}"))?;
            let template = Template::by_name(&template)?;
            let mut texts: Vec<String> = Vec::new();
            for f in &files {
                for r in load_records(f, &format)? {
                    texts.extend(r.texts().into_iter().map(str::to_owned));
                }
            }
            if with_template_markup {
                // The template's markup, as often as the records, so that it merges into few
                // tokens.
                let markup = template.markup_texts();
                let n = texts.len();
                for _ in 0..n {
                    texts.extend(markup.iter().cloned());
                }
            }
            let opts = BpeTrainingOptions::for_template(&template, vocab_size);
            let tok = train_bpe(texts.into_iter(), &opts)?;
            tok.save_dir(&out)?;
            eprintln!(
                "tokenizer: {} tokens trained on {} file(s), written to {}",
                tok.vocab_size(),
                files.len(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Runs `trainer data ...`.
///
/// # Errors
/// Bad sizes or an unwritable output directory.
pub fn data(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Addition {
            out,
            seed,
            min_digits,
            max_digits,
            train_size,
            eval_size,
        } => {
            let split = generate_addition(&AdditionConfig {
                seed,
                min_digits,
                max_digits,
                train_size: train_size as usize,
                eval_size: eval_size as usize,
            })?;
            let (train, eval) = split
                .write_jsonl(&out)
                .with_context(|| format!("writing into {}", out.display()))?;
            eprintln!(
                "addition: {} train records in {}, {} held-out in {}",
                split.train.len(),
                train.display(),
                split.eval.len(),
                eval.display()
            );
            Ok(())
        }
    }
}
