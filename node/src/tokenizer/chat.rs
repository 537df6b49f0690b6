//! Chat prompts from the model's own Jinja template, rendered as Hugging Face transformers renders them
//! (`trim_blocks` and `lstrip_blocks` on; Python string methods such as `.strip()` available; `raise_exception`).

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever else the template knows, e.g. `tool`).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the BOS and EOS texts it may insert.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts the template sees as `bos_token` / `eos_token`
    /// (empty when the model has none).
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(template_error)?;
        Ok(Self { source, env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The Jinja source as the model file gives it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt for `messages`. With `add_generation_prompt` the template ends with the header of the
    /// assistant's next turn, so that generation continues as the assistant.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(template_error)
    }
}

/// Flattens a minijinja error and its causes into one message.
fn template_error(e: Error) -> ModelError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    ModelError::ChatTemplate(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_methods_and_block_trimming() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.role.upper() }}: {{ m['content'].strip() }}\n{% endfor %}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render(&[ChatMessage::user("  hi  "), ChatMessage::assistant("yo")], false).unwrap();
        assert_eq!(out, "  USER: hi\n  ASSISTANT: yo\n</s>");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_typed() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        match t.render(&[], true) {
            Err(ModelError::ChatTemplate(m)) => assert!(m.contains("roles must alternate"), "{m}"),
            other => panic!("expected a chat template error, got {other:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(ModelError::ChatTemplate(_))));
    }
}
