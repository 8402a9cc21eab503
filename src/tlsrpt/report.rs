//! Reading a TLS report (RFC 8460 §4) the way real reporters send them:
//! strict about what identifies a report (organization, report id, date
//! range, each policy's domain and counts), lenient about the rest
//! (`mx-host` as a string or a list, `policy-string` missing or a string,
//! missing `failure-details` fields, counts that do not add up, result
//! types nobody registered).

use serde_json::Value;

/// Why a report was refused; says where in the JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("{path}: {why}")]
    Field { path: String, why: String },
    #[error("compressed report is damaged: {0}")]
    Gzip(String),
    #[error("report is larger than {limit} bytes once decompressed")]
    TooLarge { limit: usize },
}

fn field(path: impl Into<String>, why: impl Into<String>) -> ReportError {
    ReportError::Field {
        path: path.into(),
        why: why.into(),
    }
}

/// One report, as stored and summarised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub organization: String,
    pub report_id: String,
    pub contact: Option<String>,
    /// Unix seconds of `date-range`.
    pub start: i64,
    pub end: i64,
    pub policies: Vec<PolicyResult>,
}

/// One entry of `policies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyResult {
    /// `sts`, `tlsa`, `no-policy-found`, or whatever the reporter wrote.
    pub policy_type: String,
    pub policy_domain: String,
    pub policy_strings: Vec<String>,
    pub mx_hosts: Vec<String>,
    pub successful: u64,
    pub failed: u64,
    pub failures: Vec<FailureDetail>,
}

/// One entry of `failure-details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureDetail {
    /// Kept as the reporter wrote it (unknown types too).
    pub result_type: String,
    pub count: u64,
    pub receiving_mx_hostname: Option<String>,
    pub sending_mta_ip: Option<String>,
    pub receiving_ip: Option<String>,
    pub additional_information: Option<String>,
    pub failure_reason_code: Option<String>,
}

impl PolicyResult {
    /// Sum of `failed-session-count` over `failure-details` (may differ
    /// from `total-failure-session-count`: both are kept).
    pub fn detailed_failures(&self) -> u64 {
        self.failures.iter().map(|f| f.count).sum()
    }
}

/// The domain a report's `policy-domain` names, normalised (lowercase, no
/// trailing dot).
pub fn normalise_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn text(v: &Value, path: &str) -> Result<String, ReportError> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Value::String(_) => Err(field(path, "is empty")),
        Value::Null => Err(field(path, "is missing")),
        other => Err(field(
            path,
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

fn opt_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn count(v: &Value, path: &str) -> Result<u64, ReportError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| field(path, format!("{n} is not a count"))),
        // Some reporters quote numbers.
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| field(path, format!("{s:?} is not a count"))),
        Value::Null => Err(field(path, "is missing")),
        other => Err(field(
            path,
            format!("expected a number, found {}", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string, or a list of strings (what `mx-host` and `policy-string`
/// are in practice); anything else is left out.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => vec![s.trim().to_owned()],
        Value::Array(items) => items.iter().filter_map(opt_text).collect(),
        _ => Vec::new(),
    }
}

fn timestamp(v: &Value, path: &str) -> Result<i64, ReportError> {
    let s = text(v, path)?;
    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| field(path, format!("{s:?} is not an RFC 3339 date-time ({e})")))
}

impl Report {
    /// Parses a report's JSON.
    pub fn parse(bytes: &[u8]) -> Result<Report, ReportError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| ReportError::Json(e.to_string()))?;
        if !v.is_object() {
            return Err(ReportError::Json(format!(
                "expected an object, found {}",
                kind(&v)
            )));
        }
        let organization = text(&v["organization-name"], "organization-name")?;
        let report_id = text(&v["report-id"], "report-id")?;
        let range = &v["date-range"];
        if !range.is_object() {
            return Err(field("date-range", "is missing"));
        }
        let start = timestamp(&range["start-datetime"], "date-range.start-datetime")?;
        let end = timestamp(&range["end-datetime"], "date-range.end-datetime")?;
        if end < start {
            return Err(field("date-range", "ends before it starts"));
        }
        let Value::Array(items) = &v["policies"] else {
            return Err(field("policies", "is missing or not a list"));
        };
        if items.is_empty() {
            return Err(field("policies", "is empty"));
        }
        let mut policies = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |f: &str| format!("policies[{i}].{f}");
            let policy = &item["policy"];
            if !policy.is_object() {
                return Err(field(at("policy"), "is missing"));
            }
            let summary = &item["summary"];
            if !summary.is_object() {
                return Err(field(at("summary"), "is missing"));
            }
            let mut failures = Vec::new();
            if let Value::Array(details) = &item["failure-details"] {
                for (j, d) in details.iter().enumerate() {
                    let path = format!("policies[{i}].failure-details[{j}]");
                    failures.push(FailureDetail {
                        result_type: opt_text(&d["result-type"])
                            .unwrap_or_else(|| "unknown".to_owned()),
                        count: match &d["failed-session-count"] {
                            Value::Null => 0,
                            c => count(c, &format!("{path}.failed-session-count"))?,
                        },
                        receiving_mx_hostname: opt_text(&d["receiving-mx-hostname"]),
                        sending_mta_ip: opt_text(&d["sending-mta-ip"]),
                        receiving_ip: opt_text(&d["receiving-ip"]),
                        additional_information: opt_text(&d["additional-information"]),
                        failure_reason_code: opt_text(&d["failure-reason-code"]),
                    });
                }
            }
            policies.push(PolicyResult {
                policy_type: text(&policy["policy-type"], &at("policy.policy-type"))?,
                policy_domain: normalise_domain(&text(
                    &policy["policy-domain"],
                    &at("policy.policy-domain"),
                )?),
                policy_strings: strings(&policy["policy-string"]),
                mx_hosts: strings(&policy["mx-host"]),
                successful: count(
                    &summary["total-successful-session-count"],
                    &at("summary.total-successful-session-count"),
                )?,
                failed: count(
                    &summary["total-failure-session-count"],
                    &at("summary.total-failure-session-count"),
                )?,
                failures,
            });
        }
        Ok(Report {
            organization,
            report_id,
            contact: opt_text(&v["contact-info"]),
            start,
            end,
            policies,
        })
    }

    /// Every distinct policy domain of the report.
    pub fn domains(&self) -> Vec<&str> {
        let mut d: Vec<&str> = self
            .policies
            .iter()
            .map(|p| p.policy_domain.as_str())
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

/// The report's JSON from a body: gzip (sniffed by its magic bytes,
/// whatever the content type said) or JSON, at most `max` bytes once
/// decompressed.
pub fn decode(body: &[u8], max: usize) -> Result<Vec<u8>, ReportError> {
    if body.starts_with(&[0x1f, 0x8b]) {
        use std::io::Read;
        let mut out = Vec::new();
        let decoder = flate2::read::GzDecoder::new(body);
        decoder
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| ReportError::Gzip(e.to_string()))?;
        if out.len() > max {
            return Err(ReportError::TooLarge { limit: max });
        }
        return Ok(out);
    }
    if body.len() > max {
        return Err(ReportError::TooLarge { limit: max });
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_EXAMPLE: &str = r#"{
     "organization-name": "Company-X",
     "date-range": {
       "start-datetime": "2016-04-01T00:00:00Z",
       "end-datetime": "2016-04-01T23:59:59Z"
     },
     "contact-info": "sts-reporting@company-x.example",
     "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
     "policies": [{
       "policy": {
         "policy-type": "sts",
         "policy-string": ["version: STSv1","mode: testing",
               "mx: *.mail.company-y.example","max_age: 86400"],
         "policy-domain": "company-y.example",
         "mx-host": ["*.mail.company-y.example"]
       },
       "summary": {
         "total-successful-session-count": 5326,
         "total-failure-session-count": 303
       },
       "failure-details": [{
         "result-type": "certificate-expired",
         "sending-mta-ip": "2001:db8:abcd:0012::1",
         "receiving-mx-hostname": "mx1.mail.company-y.example",
         "failed-session-count": 100
       }, {
         "result-type": "starttls-not-supported",
         "sending-mta-ip": "2001:db8:abcd:0013::1",
         "receiving-mx-hostname": "mx2.mail.company-y.example",
         "receiving-ip": "203.0.113.56",
         "failed-session-count": 200,
         "additional-information": "https://reports.company-x.example/report_info?id=5065427c-23d3#StarttlsNotSupported"
       }, {
         "result-type": "validation-failure",
         "sending-mta-ip": "198.51.100.62",
         "receiving-ip": "203.0.113.58",
         "receiving-mx-hostname": "mx-backup.mail.company-y.example",
         "failed-session-count": 3,
         "failure-error-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"
       }]
     }]
   }"#;

    #[test]
    fn rfc_8460_example() {
        let r = Report::parse(RFC_EXAMPLE.as_bytes()).expect("parse");
        assert_eq!(r.organization, "Company-X");
        assert_eq!(r.start, 1_459_468_800);
        let p = &r.policies[0];
        assert_eq!(p.policy_domain, "company-y.example");
        assert_eq!((p.successful, p.failed), (5326, 303));
        assert_eq!(p.detailed_failures(), 303);
        assert_eq!(p.failures[1].result_type, "starttls-not-supported");
        assert_eq!(p.mx_hosts, ["*.mail.company-y.example"]);
    }

    #[test]
    fn lenient_shapes_of_real_reporters() {
        let r = Report::parse(
            br#"{"organization-name":"Mail.Ru","report-id":"x1","date-range":{"start-datetime":"2024-01-01T00:00:00Z","end-datetime":"2024-01-02T00:00:00Z"},
            "policies":[{"policy":{"policy-type":"sts","policy-domain":"Example.COM.","mx-host":"mx.example.com"},
            "summary":{"total-successful-session-count":"10","total-failure-session-count":7},
            "failure-details":[{"result-type":"some-new-type","failed-session-count":2},{"failed-session-count":1}]}]}"#,
        )
        .expect("lenient parse");
        let p = &r.policies[0];
        assert_eq!(p.policy_domain, "example.com");
        assert_eq!(p.mx_hosts, ["mx.example.com"]);
        assert_eq!((p.successful, p.failed, p.detailed_failures()), (10, 7, 3));
        assert_eq!(p.failures[0].result_type, "some-new-type");
        assert_eq!(p.failures[1].result_type, "unknown");
        assert!(p.policy_strings.is_empty());
    }

    #[test]
    fn errors_say_where() {
        let err = Report::parse(br#"{"organization-name":"X","report-id":"1","date-range":{"start-datetime":"2024-01-01T00:00:00Z","end-datetime":"2024-01-01T23:59:59Z"},"policies":[{"policy":{"policy-type":"sts"},"summary":{}}]}"#)
            .expect_err("no domain");
        assert_eq!(
            err.to_string(),
            "policies[0].policy.policy-domain: is missing"
        );
        let err = Report::parse(b"[1]").expect_err("not an object");
        assert!(err.to_string().contains("expected an object"), "{err}");
    }

    #[test]
    fn gzip_is_sniffed_and_bounded() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&vec![b' '; 10_000]).expect("write");
        let bomb = gz.finish().expect("finish");
        assert!(bomb.len() < 200);
        assert_eq!(
            decode(&bomb, 9_999),
            Err(ReportError::TooLarge { limit: 9_999 })
        );
        assert_eq!(decode(&bomb, 10_000).expect("fits").len(), 10_000);
        let truncated = &bomb[..bomb.len() - 6];
        assert!(matches!(
            decode(truncated, 100_000),
            Err(ReportError::Gzip(_))
        ));
        assert_eq!(decode(b"{}", 10).expect("json"), b"{}");
    }
}
