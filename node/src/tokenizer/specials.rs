//! Special tokens: finding them where the input text spells them out, and telling which ones end generation.

use crate::tokenizer::vocab::{TokenEntry, TokenKind};

/// A stretch of input text: either plain text still to be split into pieces, or a special token found in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Finds special tokens (control, user-defined, unknown) written in text, the way llama.cpp's
/// `tokenizer_st_partition` does with `parse_special = true`: the longest special token is cut out of the text
/// first, wherever it occurs, then the next longest from the remaining text, and so on.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpecialMatcher {
    /// Text and id, longest text first; among equal lengths the lower id first.
    specials: Vec<(String, u32)>,
}

impl SpecialMatcher {
    pub fn new(tokens: &[TokenEntry]) -> Self {
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(0u32..)
            .filter(|(t, _)| t.kind.is_special() && !t.text.is_empty())
            .map(|(t, id)| (t.text.clone(), id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self { specials }
    }

    /// Splits `text` into plain text and special tokens, in order. Empty text stretches are left out.
    pub fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        for (special, id) in &self.specials {
            if !fragments.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(special.as_str()))) {
                continue;
            }
            let mut split = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    split.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(special.as_str()) {
                    if at > 0 {
                        split.push(Fragment::Text(&rest[..at]));
                    }
                    split.push(Fragment::Token(*id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    split.push(Fragment::Text(rest));
                }
            }
            fragments = split;
        }
        fragments
    }
}

/// Texts by which llama.cpp recognises an end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<end_of_utterance>",
];
/// Texts of the end-of-message token (Llama 3.1 tool calls).
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
/// Fill-in-the-middle tokens that llama.cpp also treats as the end of generation.
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Every token with one of these texts ends generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// The tokens that end generation, found as llama.cpp finds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndTokens {
    /// End of turn: given by the file, or the lowest id whose text is a known end-of-turn text.
    pub eot: Option<u32>,
    /// Every end-of-generation id, sorted: EOS, EOT, EOM, the FIM pad/repo/separator tokens and every token whose
    /// text is a known end text.
    pub all: Vec<u32>,
}

fn find_by_text(texts: &[String], wanted: &[&str]) -> Option<u32> {
    texts.iter().zip(0u32..).find(|(t, _)| wanted.contains(&t.as_str())).map(|(_, id)| id)
}

/// Finds the end-of-generation tokens. Tokens recognised by their text are made control tokens when the file
/// typed them otherwise (llama.cpp does the same and warns: such a token must never be produced from plain text).
pub(crate) fn detect_end_tokens(
    texts: &[String],
    kinds: &mut [TokenKind],
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
) -> EndTokens {
    let mut promote = |id: u32| {
        let kind = &mut kinds[id as usize];
        if *kind != TokenKind::Control {
            tracing::warn!(id, text = %texts[id as usize], "end token is not typed as a control token; treating it as one");
            *kind = TokenKind::Control;
        }
    };

    let eot = eot.or_else(|| find_by_text(texts, EOT_TEXTS).inspect(|&id| promote(id)));
    let eom = eom.or_else(|| find_by_text(texts, EOM_TEXTS).inspect(|&id| promote(id)));
    let mut all: Vec<u32> = Vec::new();
    for wanted in [FIM_PAD_TEXTS, FIM_REP_TEXTS, FIM_SEP_TEXTS] {
        if let Some(id) = find_by_text(texts, wanted) {
            promote(id);
            all.push(id);
        }
    }
    for (text, id) in texts.iter().zip(0u32..) {
        if EOG_TEXTS.contains(&text.as_str()) {
            promote(id);
            all.push(id);
        }
    }
    all.extend([eos, eot, eom].into_iter().flatten());
    all.sort_unstable();
    all.dedup();
    EndTokens { eot, all }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::vocab::PieceStyle;

    fn entries(list: &[(&str, TokenKind)]) -> Vec<TokenEntry> {
        list.iter().map(|&(t, k)| TokenEntry::new(t.to_string(), k, PieceStyle::ByteLevel)).collect()
    }

    #[test]
    fn longest_special_is_cut_first() {
        let tokens = entries(&[
            ("a", TokenKind::Normal),
            ("<|im|>", TokenKind::Control),
            ("<|im|><|im|>", TokenKind::UserDefined),
            ("<unk>", TokenKind::Unknown),
        ]);
        let m = SpecialMatcher::new(&tokens);
        use Fragment::*;
        assert_eq!(m.partition(""), vec![]);
        assert_eq!(m.partition("plain a"), vec![Text("plain a")]);
        assert_eq!(m.partition("x<|im|><|im|><|im|>y<unk>"), vec![Text("x"), Token(2), Token(1), Text("y"), Token(3)]);
        assert_eq!(m.partition("<|im|>"), vec![Token(1)]);
        assert_eq!(m.partition("<|im|"), vec![Text("<|im|")]);
    }

    #[test]
    fn end_tokens_by_id_and_text() {
        let texts: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello", "<reponame>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut kinds =
            vec![TokenKind::Control, TokenKind::Control, TokenKind::Normal, TokenKind::Normal, TokenKind::Control];
        let ends = detect_end_tokens(&texts, &mut kinds, Some(2), None, None);
        assert_eq!(ends.eot, Some(0));
        assert_eq!(ends.all, vec![0, 2, 4]);
        assert_eq!(kinds[2], TokenKind::Control, "<|im_end|> is promoted to a control token");
        assert_eq!(kinds[3], TokenKind::Normal);
    }
}
