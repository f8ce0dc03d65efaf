//! Response link rewriting (placeholder until the full rewriter lands).
#[derive(Debug, Clone)]
pub struct Rewriter;
impl Rewriter {
    pub fn new(_upstream: &url::Url) -> Self {
        Rewriter
    }
    pub fn rewrite_url(&self, _s: &str, _public_base: &str) -> Option<String> {
        None
    }
    pub fn rewrite_json(&self, _body: &[u8], _public_base: &str) -> Option<(Vec<u8>, usize)> {
        None
    }
    pub fn rewrite_link_header(&self, _value: &str, _public_base: &str) -> Option<String> {
        None
    }
}
pub fn is_json_content_type(content_type: &str) -> bool {
    content_type.contains("json")
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}
impl Encoding {
    pub fn from_header(v: Option<&str>) -> Option<Encoding> {
        match v {
            None => Some(Encoding::Identity),
            _ => None,
        }
    }
}
#[derive(Debug, thiserror::Error)]
#[error("decode")]
pub struct RewriteError;
pub fn decode(_enc: Encoding, body: &[u8], _limit: usize) -> Result<Vec<u8>, RewriteError> {
    Ok(body.to_vec())
}
pub fn encode(_enc: Encoding, body: &[u8]) -> Vec<u8> {
    body.to_vec()
}
