//! Reading a replica's own load from its Prometheus metrics, so that every
//! edge sees the load other edges put on a replica.

use stoke_config::LoadFormat;

/// The metric names (running, waiting) of each dialect.
pub fn metric_names(format: LoadFormat) -> (&'static str, &'static str) {
    match format {
        LoadFormat::Vllm => ("vllm:num_requests_running", "vllm:num_requests_waiting"),
        LoadFormat::Tgi => ("tgi_batch_current_size", "tgi_queue_size"),
        LoadFormat::Sglang => ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    }
}

/// Running plus waiting requests in a Prometheus text exposition, summed
/// over label sets (one per model on multi-model servers). `None` if
/// neither metric is present.
pub fn parse_load(text: &str, format: LoadFormat) -> Option<u32> {
    let (running, waiting) = metric_names(format);
    let mut total = 0.0f64;
    let mut seen = false;
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace()).unwrap_or(line.len());
        let name = &line[..name_end];
        if name != running && name != waiting {
            continue;
        }
        // Skip the label set, which may contain spaces inside quotes.
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let Some(close) = closing_brace(rest) else { continue };
            rest = &rest[close + 1..];
        }
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if value.is_finite() && value >= 0.0 {
            total += value;
            seen = true;
        }
    }
    seen.then(|| total.round().min(f64::from(u32::MAX)) as u32)
}

/// Index of the `}` closing a label set that starts at 0, honouring quotes
/// and escapes.
fn closing_brace(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_text() {
        let text = r#"# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 3.0
vllm:num_requests_waiting{model_name="llama"} 2.0
vllm:num_requests_running{model_name="other, {odd} \"name\""} 1.0
vllm:gpu_cache_usage_perc{model_name="llama"} 0.5
"#;
        assert_eq!(parse_load(text, LoadFormat::Vllm), Some(6));
    }

    #[test]
    fn other_dialects() {
        assert_eq!(parse_load("tgi_batch_current_size 4\ntgi_queue_size 1\n", LoadFormat::Tgi), Some(5));
        assert_eq!(parse_load("sglang:num_running_reqs{a=\"b\"} 2 1700000000\n", LoadFormat::Sglang), Some(2));
    }

    #[test]
    fn absent_or_garbage() {
        assert_eq!(parse_load("", LoadFormat::Vllm), None);
        assert_eq!(parse_load("vllm:num_requests_running{unclosed 3", LoadFormat::Vllm), None);
        assert_eq!(parse_load("vllm:num_requests_running NaN\n", LoadFormat::Vllm), None);
        assert_eq!(parse_load("vllm:num_requests_running -1\n", LoadFormat::Vllm), None);
        assert_eq!(parse_load("vllm:num_requests_running_total 5\n", LoadFormat::Vllm), None);
    }
}
