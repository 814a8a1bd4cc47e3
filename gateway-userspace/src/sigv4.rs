//! AWS Signature Version 4: verification of the admin API's requests, and signing for our
//! own CLI.
//!
//! The admin API speaks API Gateway's wire format, so its clients are boto3 and the aws CLI
//! (both built on botocore). This module owns the SigV4 algorithm as AWS publishes it
//! (canonical request, string to sign, derived signing key, HMAC-SHA256), canonicalized the
//! way botocore does it for non-S3 services, which is what those clients sign:
//!
//! - **path**: the raw path as sent, with `.`, `..` and empty segments removed (an empty path
//!   is `/`), then every byte outside RFC 3986's unreserved set and `/` percent-encoded. The
//!   path on the wire is already encoded once, so a label that carries `%2F` or `%3A` is
//!   signed as `%252F` / `%253A` ("double encoding", as AWS requires for every service but
//!   S3).
//! - **query**: every `key=value` pair percent-decoded and re-encoded (unreserved kept,
//!   uppercase hex, `+` is a literal plus), sorted by key then value; a key without `=`
//!   signs as `key=`.
//! - **headers**: exactly those named in `SignedHeaders`, in that order; each value trimmed
//!   with inner whitespace runs collapsed to one space; repeated headers joined with `,`.
//!   `host` falls back to the URI's authority (HTTP/2 `:authority`) when there is no `Host`.
//! - **payload**: hex SHA-256 of the body as received. `x-amz-content-sha256` is only
//!   another header: `UNSIGNED-PAYLOAD` is not honoured, so a signature always covers the
//!   body (botocore always hashes the body over plain HTTP).
//! - **time**: `x-amz-date` (ISO 8601 basic, `YYYYMMDD'T'HHMMSS'Z'`), else `Date` (that form
//!   or an RFC 2822 / HTTP date), must lie within [`MAX_CLOCK_SKEW`] of the server's clock and
//!   on the credential scope's day.
//!
//! Invariants: [`verify`] never panics on client input and compares signatures in constant
//! time ([`hmac::Mac::verify_slice`]); no secret key appears in a `Debug` output, an error or
//! a message. Presigned (query-string) authentication is not supported: such a request has
//! no `Authorization` header and gets `MissingAuthenticationToken`. `X-Amz-Security-Token` is
//! not interpreted (there are no session credentials); when signed it is covered like any
//! other header.
//!
//! # Error texts
//!
//! [`SigV4Error::message`] returns AWS's own text wherever a public AWS response shows it;
//! every error is `403` with the `x-amzn-ErrorType` of [`SigV4Error::error_type`], as API
//! Gateway (a REST-JSON service) answers. Where the texts were confirmed:
//!
//! - AWS IAM User Guide, "Troubleshoot Signature Version 4 signing": `Missing Authentication
//!   Token`; `The request signature we calculated does not match the signature you provided`
//!   with the canonical request and string to sign appended; the prefixes `Signature expired:
//!   … is now earlier than …`, `Signature not yet current: … is still later than …`, `Date in
//!   Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP`.
//! - API Gateway responses quoted in public issues: `MissingAuthenticationTokenException`
//!   with 403 (aws/chalice#12); the full mismatch text with `The Canonical String for this
//!   request should have been` / `The String-to-Sign should have been` (mhart/aws4#33,
//!   postmanlabs/postman-app-support#1663); `The security token included in the request is
//!   invalid.` as 403 `UnrecognizedClientException` (badslug/Paw-AWSSignature4DynamicValue#5);
//!   `Authorization header requires 'Credential' parameter. … 'Signature' … 'SignedHeaders' …
//!   existence of either a 'X-Amz-Date' or a 'Date' header. Authorization=…` as 403
//!   (aws/chalice#828, nordcloud/cognitocurl#28, brendanhay/amazonka#316).
//! - Other AWS services' responses in public issues: `Signature expired: A is now earlier
//!   than B (C - 5 min.)` (hassy/artillery-dino#2, remind101/logspout-kinesis#21);
//!   `Credential should be scoped to correct service: 'x'. ` as `InvalidSignatureException`
//!   (aws/aws-sdk-ruby#431, aws/aws-sdk-go#1850 with 403); `'Host' or ':authority' must be a
//!   'SignedHeader' in the AWS Authorization.` as `InvalidSignatureException`
//!   (aws/aws-sdk-php#2469, aws/aws-sdk-js-v3#3796 with 403); `'…' not a valid key=value pair
//!   (missing equal-sign) in Authorization header: '…'.` as `IncompleteSignatureException`
//!   (iann0036/cloud9-sync#10, awslabs/fhir-works-on-aws-deployment#379); `Credential must
//!   have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '…'`
//!   as `IncompleteSignatureException`
//!   (prometheus-community/yet-another-cloudwatch-exporter#169); `Date must be in ISO-8601
//!   'basic format'. Got '…'. See http://en.wikipedia.org/wiki/ISO_8601` as
//!   `IncompleteSignature` (brendanhay/amazonka#5, umegaya/lua-aws#18); `Credential should
//!   be scoped to a valid region, not '…'. ` (aws/aws-sdk-ruby#508, aws/aws-sdk-js#792).
//! - Not confirmed, written after the confirmed ones: the tails of `Signature not yet
//!   current` (`(C + 5 min.)`) and of the credential-date mismatch (`: 'A' != 'B', from
//!   'C'.`), `Credential should be scoped with a valid terminator: 'aws4_request', not '…'. `,
//!   and our own text for an algorithm other than `AWS4-HMAC-SHA256`.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use http::header::{AUTHORIZATION, DATE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Uri};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc2822;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// The signing name of the admin API: the service part of the credential scope.
pub const SERVICE: &str = "apigateway";

/// How far a request's signing time may lie from the server's clock, either way: 5 minutes,
/// AWS's bound for SigV4 (its "Signature expired: … (… - 5 min.)" answer). It limits how long
/// a captured request can be replayed.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The only signing algorithm accepted and produced.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The fixed last element of a SigV4 credential scope.
const TERMINATOR: &str = "aws4_request";

const X_AMZ_DATE: &str = "x-amz-date";

/// Headers [`sign`] leaves out of the signature: hop-by-hop headers a proxy may rewrite and
/// those botocore never signs (`user-agent`, `x-amzn-trace-id`), plus `authorization`.
const UNSIGNED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

type HmacSha256 = Hmac<Sha256>;

/// A static AWS-style key pair: the access key id travels in every request's credential
/// scope; the secret never leaves this process and is never printed (see the `Debug` impl).
#[derive(Clone)]
pub struct Credentials {
    /// The public half, e.g. `AKIAIOSFODNN7EXAMPLE`.
    pub access_key_id: String,
    /// The shared secret the signing key is derived from.
    pub secret_access_key: String,
}

impl Credentials {
    /// A key pair from its two halves.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Why a request's signature was refused (or, for [`SigV4Error::Unsignable`], could not be
/// made). `Display` is AWS's message; [`SigV4Error::message`] adds, for a mismatch, the
/// canonical request and string to sign the client should compare with its own.
#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    /// No `Authorization` header.
    #[error("Missing Authentication Token")]
    MissingAuthenticationToken,
    /// A parameter of the `Authorization` header has no `=`.
    #[error(
        "'{pair}' not a valid key=value pair (missing equal-sign) in Authorization header: '{authorization}'."
    )]
    NotKeyValuePair {
        /// The offending token.
        pair: String,
        /// The whole header as received.
        authorization: String,
    },
    /// `Credential`, `Signature` or `SignedHeaders` is missing, or there is neither an
    /// `X-Amz-Date` nor a `Date` header.
    #[error("{} Authorization={authorization}", .missing.join(" "))]
    MissingComponents {
        /// One AWS sentence per missing part, in AWS's order.
        missing: Vec<&'static str>,
        /// The whole header as received.
        authorization: String,
    },
    /// The header names an algorithm other than `AWS4-HMAC-SHA256`.
    #[error("Authorization header must use the 'AWS4-HMAC-SHA256' algorithm, not '{algorithm}'.")]
    UnsupportedAlgorithm {
        /// The algorithm the header names.
        algorithm: String,
    },
    /// `Credential` is not `keyid/date/region/service/term`.
    #[error(
        "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '{credential}'"
    )]
    MalformedCredential {
        /// The `Credential` value as received.
        credential: String,
    },
    /// `X-Amz-Date` (or `Date`) is not a timestamp in ISO 8601 basic format.
    #[error(
        "Date must be in ISO-8601 'basic format'. Got '{value}'. See http://en.wikipedia.org/wiki/ISO_8601"
    )]
    MalformedDate {
        /// The header value as received.
        value: String,
    },
    /// The credential scope does not end in `aws4_request`.
    #[error(
        "Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'. "
    )]
    WrongTerminator {
        /// The scope's last element.
        terminator: String,
    },
    /// The credential scope's region is empty (any other region is accepted).
    #[error("Credential should be scoped to a valid region, not '{region}'. ")]
    InvalidRegion {
        /// The scope's region.
        region: String,
    },
    /// The credential scope names another service.
    #[error("Credential should be scoped to correct service: '{expected}'. ")]
    WrongService {
        /// The service this endpoint is ([`SERVICE`]).
        expected: String,
        /// The service the scope names.
        scoped: String,
    },
    /// The credential scope's date is not the day of the request's timestamp.
    #[error(
        "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{scope_date}' != '{request_date}', from '{timestamp}'."
    )]
    CredentialDateMismatch {
        /// `YYYYMMDD` from the scope.
        scope_date: String,
        /// `YYYYMMDD` of the request's timestamp.
        request_date: String,
        /// The request's timestamp, ISO 8601 basic.
        timestamp: String,
    },
    /// `host` is not among `SignedHeaders`, so the signature could be replayed to another
    /// host.
    #[error("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")]
    HostNotSigned,
    /// The request was signed more than [`MAX_CLOCK_SKEW`] before `now`.
    #[error("Signature expired: {signed_at} is now earlier than {earliest} ({now} - 5 min.)")]
    SignatureExpired {
        /// The request's timestamp, ISO 8601 basic.
        signed_at: String,
        /// `now - MAX_CLOCK_SKEW`.
        earliest: String,
        /// The server's time.
        now: String,
    },
    /// The request was signed more than [`MAX_CLOCK_SKEW`] after `now`.
    #[error("Signature not yet current: {signed_at} is still later than {latest} ({now} + 5 min.)")]
    SignatureNotYetCurrent {
        /// The request's timestamp, ISO 8601 basic.
        signed_at: String,
        /// `now + MAX_CLOCK_SKEW`.
        latest: String,
        /// The server's time.
        now: String,
    },
    /// The access key id is not ours.
    #[error("The security token included in the request is invalid.")]
    UnrecognizedClient {
        /// The access key id the request names (public; safe to log).
        access_key_id: String,
    },
    /// The signature is not the one our secret gives for this request.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    SignatureMismatch {
        /// The canonical request the server computed (headers the client signed; no secret).
        canonical_request: String,
        /// The string to sign the server computed.
        string_to_sign: String,
    },
    /// [`sign`] only: the request cannot be signed as it is.
    #[error("cannot sign the request: {reason}")]
    Unsignable {
        /// What to fix.
        reason: String,
    },
}

impl SigV4Error {
    /// AWS's `x-amzn-ErrorType` for this refusal.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            Self::NotKeyValuePair { .. }
            | Self::MissingComponents { .. }
            | Self::UnsupportedAlgorithm { .. }
            | Self::MalformedCredential { .. }
            | Self::MalformedDate { .. }
            | Self::Unsignable { .. } => "IncompleteSignatureException",
            Self::WrongTerminator { .. }
            | Self::InvalidRegion { .. }
            | Self::WrongService { .. }
            | Self::CredentialDateMismatch { .. }
            | Self::HostNotSigned
            | Self::SignatureExpired { .. }
            | Self::SignatureNotYetCurrent { .. }
            | Self::SignatureMismatch { .. } => "InvalidSignatureException",
            Self::UnrecognizedClient { .. } => "UnrecognizedClientException",
        }
    }

    /// AWS's message text, for the `{"message": …}` body. For a signature mismatch it carries
    /// the canonical request and string to sign, as AWS's does, so a client can find the
    /// difference; neither contains a secret.
    pub fn message(&self) -> String {
        match self {
            Self::SignatureMismatch {
                canonical_request,
                string_to_sign,
            } => format!(
                "{self}\n\nThe Canonical String for this request should have been\n'{canonical_request}'\n\nThe String-to-Sign should have been\n'{string_to_sign}'\n"
            ),
            _ => self.to_string(),
        }
    }

    /// The HTTP status: API Gateway answers every authentication failure with 403.
    pub fn status(&self) -> u16 {
        403
    }
}

/// Verifies the `Authorization` header (`AWS4-HMAC-SHA256 Credential=AKID/date/region/service/
/// aws4_request, SignedHeaders=…, Signature=…`) of a request whose body is fully read.
///
/// Any non-empty region is accepted; the service must be [`SERVICE`]; `host` must be signed;
/// `x-amz-date` (or `Date`) must lie within [`MAX_CLOCK_SKEW`] of `now` and on the scope's day;
/// an access key id other than `creds.access_key_id` is `UnrecognizedClient`. The signature
/// is compared in constant time. Checks run in that order, so the first failure is reported.
pub fn verify(
    parts: &Parts,
    body: &[u8],
    creds: &Credentials,
    now: SystemTime,
) -> Result<(), SigV4Error> {
    verify_for_service(parts, body, creds, now, SERVICE)
}

/// Signs a request for the admin API: sets `x-amz-date` to `now` and `Authorization`, adding
/// `Host` from the URI's authority (default port left out) when the request has none, so
/// [`verify`] and AWS accept it. Every header present is signed except hop-by-hop ones and
/// `user-agent`; headers added afterwards are simply not covered. `region` is the caller's
/// (any non-empty name). `body` must be the exact bytes that will be sent.
pub fn sign(
    parts: &mut Parts,
    body: &[u8],
    creds: &Credentials,
    region: &str,
    now: SystemTime,
) -> Result<(), SigV4Error> {
    sign_for_service(parts, body, creds, region, SERVICE, now)
}

fn verify_for_service(
    parts: &Parts,
    body: &[u8],
    creds: &Credentials,
    now: SystemTime,
    service: &str,
) -> Result<(), SigV4Error> {
    let Some(header) = parts.headers.get(AUTHORIZATION) else {
        return Err(SigV4Error::MissingAuthenticationToken);
    };
    let authorization = String::from_utf8_lossy(header.as_bytes());
    let auth = AuthorizationHeader::parse(&authorization)?;
    let date_header = parts
        .headers
        .get(X_AMZ_DATE)
        .map(|v| (v, true))
        .or_else(|| parts.headers.get(DATE).map(|v| (v, false)));

    let (Some(credential), Some(signed_headers), Some(signature), Some((date_value, amz_date))) = (
        auth.credential,
        auth.signed_headers,
        auth.signature,
        date_header,
    ) else {
        let mut missing = Vec::new();
        if auth.credential.is_none() {
            missing.push("Authorization header requires 'Credential' parameter.");
        }
        if auth.signature.is_none() {
            missing.push("Authorization header requires 'Signature' parameter.");
        }
        if auth.signed_headers.is_none() {
            missing.push("Authorization header requires 'SignedHeaders' parameter.");
        }
        if date_header.is_none() {
            missing.push(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            );
        }
        return Err(SigV4Error::MissingComponents {
            missing,
            authorization: authorization.into_owned(),
        });
    };
    if auth.algorithm != ALGORITHM {
        return Err(SigV4Error::UnsupportedAlgorithm {
            algorithm: auth.algorithm.to_owned(),
        });
    }
    let scope = CredentialScope::parse(credential)?;
    let signed_at = parse_request_time(date_value, amz_date)?;
    let timestamp = iso_basic(signed_at);

    if scope.terminator != TERMINATOR {
        return Err(SigV4Error::WrongTerminator {
            terminator: scope.terminator.to_owned(),
        });
    }
    if scope.date != &timestamp[..8] {
        return Err(SigV4Error::CredentialDateMismatch {
            scope_date: scope.date.to_owned(),
            request_date: timestamp[..8].to_owned(),
            timestamp,
        });
    }
    if scope.region.is_empty() {
        return Err(SigV4Error::InvalidRegion {
            region: String::new(),
        });
    }
    if scope.service != service {
        return Err(SigV4Error::WrongService {
            expected: service.to_owned(),
            scoped: scope.service.to_owned(),
        });
    }
    if !signed_headers
        .split(';')
        .any(|name| name.eq_ignore_ascii_case("host"))
    {
        return Err(SigV4Error::HostNotSigned);
    }
    check_clock_skew(signed_at, now)?;
    if scope.access_key_id != creds.access_key_id {
        return Err(SigV4Error::UnrecognizedClient {
            access_key_id: scope.access_key_id.to_owned(),
        });
    }

    let headers: Vec<(&str, Vec<u8>)> = signed_headers
        .split(';')
        .map(|name| {
            (
                name,
                canonical_header_value(&parts.headers, &parts.uri, name),
            )
        })
        .collect();
    let canonical_request = canonical_request(
        &parts.method,
        &parts.uri,
        &headers,
        signed_headers,
        &hex_sha256(body),
    );
    let string_to_sign = string_to_sign(
        &timestamp,
        scope.date,
        scope.region,
        scope.service,
        &canonical_request,
    );
    let mac = signing_mac(
        &creds.secret_access_key,
        scope.date,
        scope.region,
        scope.service,
        string_to_sign.as_bytes(),
    );
    // A signature that is not even hex cannot match; it still gets the mismatch answer.
    let provided = hex::decode(signature).unwrap_or_default();
    if mac.verify_slice(&provided).is_ok() {
        Ok(())
    } else {
        Err(SigV4Error::SignatureMismatch {
            canonical_request: String::from_utf8_lossy(&canonical_request).into_owned(),
            string_to_sign,
        })
    }
}

fn sign_for_service(
    parts: &mut Parts,
    body: &[u8],
    creds: &Credentials,
    region: &str,
    service: &str,
    now: SystemTime,
) -> Result<(), SigV4Error> {
    if region.is_empty() {
        return Err(SigV4Error::Unsignable {
            reason: "the region is empty".to_owned(),
        });
    }
    if !parts.headers.contains_key(HOST) {
        let host = host_from_uri(&parts.uri).ok_or_else(|| SigV4Error::Unsignable {
            reason: "the request has neither a Host header nor an absolute URI".to_owned(),
        })?;
        let value = HeaderValue::from_str(&host).map_err(|_| SigV4Error::Unsignable {
            reason: format!("the URI's host {host:?} is not a valid header value"),
        })?;
        parts.headers.insert(HOST, value);
    }
    let timestamp = iso_basic(OffsetDateTime::from(now));
    let date = &timestamp[..8];
    parts.headers.remove(AUTHORIZATION);
    parts.headers.insert(
        HeaderName::from_static(X_AMZ_DATE),
        HeaderValue::from_str(&timestamp).expect("an ISO 8601 basic timestamp is ASCII"),
    );

    let mut names: Vec<&str> = parts
        .headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|name| !UNSIGNED_HEADERS.contains(name))
        .collect();
    names.sort_unstable();
    let signed_headers = names.join(";");
    let headers: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(|&name| {
            (
                name,
                canonical_header_value(&parts.headers, &parts.uri, name),
            )
        })
        .collect();
    let canonical_request = canonical_request(
        &parts.method,
        &parts.uri,
        &headers,
        &signed_headers,
        &hex_sha256(body),
    );
    let string_to_sign = string_to_sign(&timestamp, date, region, service, &canonical_request);
    let signature = hex::encode(
        signing_mac(
            &creds.secret_access_key,
            date,
            region,
            service,
            string_to_sign.as_bytes(),
        )
        .finalize()
        .into_bytes(),
    );
    let authorization = format!(
        "{ALGORITHM} Credential={}/{date}/{region}/{service}/{TERMINATOR}, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id
    );
    let mut value = HeaderValue::from_str(&authorization).map_err(|_| SigV4Error::Unsignable {
        reason: "the access key id or region contains characters not allowed in a header"
            .to_owned(),
    })?;
    value.set_sensitive(true);
    parts.headers.insert(AUTHORIZATION, value);
    Ok(())
}

/// The parameters of an `Authorization` header, borrowed from it.
struct AuthorizationHeader<'a> {
    algorithm: &'a str,
    credential: Option<&'a str>,
    signed_headers: Option<&'a str>,
    signature: Option<&'a str>,
}

impl<'a> AuthorizationHeader<'a> {
    /// Splits `ALGORITHM k=v, k=v, …`. Like AWS, parameters are separated by commas and/or
    /// whitespace, so `Credential= AKID/…` is a bare `AKID/…` without `=`; unknown keys are
    /// ignored.
    fn parse(value: &'a str) -> Result<Self, SigV4Error> {
        let trimmed = value.trim();
        let (algorithm, rest) = trimmed
            .split_once(|c: char| c.is_ascii_whitespace())
            .unwrap_or((trimmed, ""));
        let mut parsed = Self {
            algorithm,
            credential: None,
            signed_headers: None,
            signature: None,
        };
        for pair in rest
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|pair| !pair.is_empty())
        {
            let Some((key, val)) = pair.split_once('=') else {
                return Err(SigV4Error::NotKeyValuePair {
                    pair: pair.to_owned(),
                    authorization: value.to_owned(),
                });
            };
            match key {
                "Credential" => parsed.credential = Some(val),
                "SignedHeaders" => parsed.signed_headers = Some(val),
                "Signature" => parsed.signature = Some(val),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// `AKID/YYYYMMDD/region/service/aws4_request`, borrowed from the `Credential` parameter.
struct CredentialScope<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    terminator: &'a str,
}

impl<'a> CredentialScope<'a> {
    fn parse(credential: &'a str) -> Result<Self, SigV4Error> {
        let elements: Vec<&str> = credential.split('/').collect();
        let &[access_key_id, date, region, service, terminator] = elements.as_slice() else {
            return Err(SigV4Error::MalformedCredential {
                credential: credential.to_owned(),
            });
        };
        Ok(Self {
            access_key_id,
            date,
            region,
            service,
            terminator,
        })
    }
}

/// The request's signing time: `x-amz-date` must be ISO 8601 basic; a `Date` header may also
/// be an RFC 2822 / HTTP date (botocore sends that form when a request already has `Date`).
fn parse_request_time(value: &HeaderValue, amz_date: bool) -> Result<OffsetDateTime, SigV4Error> {
    let text = String::from_utf8_lossy(value.as_bytes());
    let parsed = parse_iso_basic(text.trim()).or_else(|| {
        if amz_date {
            None
        } else {
            parse_http_date(text.trim())
        }
    });
    parsed.ok_or_else(|| SigV4Error::MalformedDate {
        value: text.into_owned(),
    })
}

/// `YYYYMMDD'T'HHMMSS'Z'`, strictly (no separators, no fraction, UTC only).
fn parse_iso_basic(text: &str) -> Option<OffsetDateTime> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        b.get(range)?.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let day = u8::try_from(digits(6..8)?).ok()?;
    let hour = u8::try_from(digits(9..11)?).ok()?;
    let minute = u8::try_from(digits(11..13)?).ok()?;
    let second = u8::try_from(digits(13..15)?).ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms(hour, minute, second).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

/// `Sun, 30 Aug 2015 12:36:00 GMT` (HTTP) or `… -0000` / `… +0000` (RFC 2822).
fn parse_http_date(text: &str) -> Option<OffsetDateTime> {
    let numeric = match text.strip_suffix(" GMT") {
        Some(head) => Cow::Owned(format!("{head} +0000")),
        None => Cow::Borrowed(text),
    };
    OffsetDateTime::parse(&numeric, &Rfc2822).ok()
}

/// `YYYYMMDD'T'HHMMSS'Z'` in UTC, as SigV4 writes timestamps.
fn iso_basic(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn check_clock_skew(signed_at: OffsetDateTime, now: SystemTime) -> Result<(), SigV4Error> {
    let now = OffsetDateTime::from(now);
    // Whole seconds, as timestamps are written, so the boundary reads the way it is checked.
    let now = now - Duration::from_nanos(u64::from(now.nanosecond()));
    let earliest = now - MAX_CLOCK_SKEW;
    let latest = now + MAX_CLOCK_SKEW;
    if signed_at < earliest {
        return Err(SigV4Error::SignatureExpired {
            signed_at: iso_basic(signed_at),
            earliest: iso_basic(earliest),
            now: iso_basic(now),
        });
    }
    if signed_at > latest {
        return Err(SigV4Error::SignatureNotYetCurrent {
            signed_at: iso_basic(signed_at),
            latest: iso_basic(latest),
            now: iso_basic(now),
        });
    }
    Ok(())
}

/// The header's values, each trimmed with inner whitespace runs collapsed, joined with `,`.
/// `host` falls back to the URI's authority (HTTP/2 carries it as `:authority`). A signed
/// header the request lacks canonicalizes as empty, which then fails to match.
fn canonical_header_value(headers: &HeaderMap, uri: &Uri, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        if name.eq_ignore_ascii_case("host")
            && let Some(authority) = uri.authority()
        {
            out.extend_from_slice(authority.as_str().as_bytes());
        }
        return out;
    }
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        for (j, word) in value
            .as_bytes()
            .split(u8::is_ascii_whitespace)
            .filter(|word| !word.is_empty())
            .enumerate()
        {
            if j > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(word);
        }
    }
    out
}

/// `METHOD\nPATH\nQUERY\nname:value\n…\n\nSIGNED;HEADERS\nPAYLOAD_HASH`, as bytes (header
/// values need not be UTF-8).
fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &[(&str, Vec<u8>)],
    signed_headers: &str,
    payload_hash: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_path(uri.path()).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(uri.query()).as_bytes());
    out.push(b'\n');
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    out
}

/// The raw path with dot and empty segments removed (botocore's `remove_dot_segments`: a
/// trailing slash survives unless nothing is left or the path ends in a dot segment), then
/// encoded once more with `/` kept.
fn canonical_path(raw: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in raw.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(raw.len() + 1);
    if raw.is_empty() || raw.starts_with('/') {
        normalized.push('/');
    }
    normalized.push_str(&segments.join("/"));
    if raw.ends_with('/') && !segments.is_empty() {
        normalized.push('/');
    }
    let mut out = String::with_capacity(normalized.len());
    uri_encode_into(normalized.as_bytes(), true, &mut out);
    out
}

/// Pairs decoded and re-encoded, sorted by encoded key then value, joined with `&`.
fn canonical_query(raw: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = raw
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let mut k = String::new();
            let mut v = String::new();
            uri_encode_into(&percent_decode(key), false, &mut k);
            uri_encode_into(&percent_decode(value), false, &mut v);
            (k, v)
        })
        .collect();
    pairs.sort_unstable();
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// RFC 3986 percent-encoding of everything but unreserved characters (and `/` if asked),
/// uppercase hex, as SigV4 requires.
fn uri_encode_into(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits stays literal, and so does `+`.
fn percent_decode(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                b.get(i + 1).and_then(|&c| char::from(c).to_digit(16)),
                b.get(i + 2).and_then(|&c| char::from(c).to_digit(16)),
            )
        {
            out.push(u8::try_from(hi * 16 + lo).expect("two hex digits fit in a byte"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn string_to_sign(
    timestamp: &str,
    date: &str,
    region: &str,
    service: &str,
    canonical_request: &[u8],
) -> String {
    format!(
        "{ALGORITHM}\n{timestamp}\n{date}/{region}/{service}/{TERMINATOR}\n{}",
        hex_sha256(canonical_request)
    )
}

/// An HMAC keyed with the derived signing key (`AWS4`+secret → date → region → service →
/// `aws4_request`) that has absorbed `message`.
fn signing_mac(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    message: &[u8],
) -> HmacSha256 {
    let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, service, TERMINATOR] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The authority without userinfo and without the scheme's default port, as HTTP clients
/// send `Host`.
fn host_from_uri(uri: &Uri) -> Option<String> {
    let authority = uri.authority()?;
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, host)| host);
    let default_port = match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    };
    match (authority.port_u16(), default_port) {
        (Some(port), Some(default)) if port == default => host_port
            .strip_suffix(&format!(":{port}"))
            .map(str::to_owned),
        _ => Some(host_port.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    /// 2015-08-30T12:36:00Z, the AWS test suite's signing time.
    const SUITE_EPOCH: u64 = 1_440_938_160;

    fn creds() -> Credentials {
        Credentials::new(AKID, SECRET)
    }

    fn at(epoch_secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_secs)
    }

    fn suite_now() -> SystemTime {
        at(SUITE_EPOCH)
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("valid test request").into_parts().0
    }

    fn auth_header(parts: &Parts) -> &str {
        parts.headers[AUTHORIZATION]
            .to_str()
            .expect("Authorization is ASCII")
    }

    // --- AWS's published SigV4 test suite (service `service`, region us-east-1) ----------

    /// (name, method, uri, headers besides Host and X-Amz-Date, body, signed headers,
    /// signature) from the suite's request.txt / header-signature.txt.
    type Vector = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
        &'static str,
        &'static str,
    );

    const SUITE: &[Vector] = &[
        (
            "get-vanilla",
            "GET",
            "/",
            &[],
            "",
            "host;x-amz-date",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "get-vanilla-query-order-key-case",
            "GET",
            "/?Param2=value2&Param1=value1",
            &[],
            "",
            "host;x-amz-date",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "get-vanilla-query-order-encoded",
            "GET",
            "/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
            &[],
            "",
            "host;x-amz-date",
            "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
        ),
        (
            "get-vanilla-query-unreserved",
            "GET",
            "/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            &[],
            "",
            "host;x-amz-date",
            "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
        ),
        (
            "get-vanilla-utf8-query",
            "GET",
            "/?%E1%88%B4=bar",
            &[],
            "",
            "host;x-amz-date",
            "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
        ),
        (
            "get-unreserved",
            "GET",
            "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            &[],
            "",
            "host;x-amz-date",
            "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
        ),
        (
            "get-relative-relative-normalized",
            "GET",
            "/example1/example2/../..",
            &[],
            "",
            "host;x-amz-date",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "get-slash-dot-slash-normalized",
            "GET",
            "/./",
            &[],
            "",
            "host;x-amz-date",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "get-header-value-trim",
            "GET",
            "/",
            &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
            "",
            "host;my-header1;my-header2;x-amz-date",
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ),
        (
            "get-header-key-duplicate",
            "GET",
            "/",
            &[
                ("My-Header1", "value2"),
                ("My-Header1", "value2"),
                ("My-Header1", "value1"),
            ],
            "",
            "host;my-header1;x-amz-date",
            "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
        ),
        (
            "post-header-key-sort",
            "POST",
            "/",
            &[("My-Header1", "value1")],
            "",
            "host;my-header1;x-amz-date",
            "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
        ),
        (
            "post-vanilla-query",
            "POST",
            "/?Param1=value1",
            &[],
            "",
            "host;x-amz-date",
            "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
        ),
        (
            "get-vanilla-with-session-token",
            "GET",
            "/",
            &[(
                "X-Amz-Security-Token",
                "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267",
            )],
            "",
            "host;x-amz-date;x-amz-security-token",
            "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
        ),
        (
            "post-x-www-form-urlencoded",
            "POST",
            "/",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Content-Length", "13"),
                (
                    "X-Amz-Content-Sha256",
                    "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
                ),
            ],
            "Param1=value1",
            "content-length;content-type;host;x-amz-content-sha256;x-amz-date",
            "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
        ),
    ];

    fn suite_request(vector: &Vector) -> Parts {
        let (_, method, uri, extra, _, _, _) = *vector;
        let mut headers = vec![("Host", "example.amazonaws.com")];
        headers.extend_from_slice(extra);
        parts(method, uri, &headers)
    }

    fn suite_authorization(vector: &Vector) -> String {
        let (_, _, _, _, _, signed, signature) = *vector;
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed}, Signature={signature}"
        )
    }

    #[test]
    fn aws_test_suite_signatures_are_reproduced_by_sign() {
        for vector in SUITE {
            let mut request = suite_request(vector);
            sign_for_service(
                &mut request,
                vector.4.as_bytes(),
                &creds(),
                "us-east-1",
                "service",
                suite_now(),
            )
            .expect("signable");
            assert_eq!(
                auth_header(&request),
                suite_authorization(vector),
                "{}",
                vector.0
            );
            assert_eq!(request.headers[X_AMZ_DATE], "20150830T123600Z");
        }
    }

    #[test]
    fn aws_test_suite_signatures_are_accepted_by_verify() {
        for vector in SUITE {
            let mut request = suite_request(vector);
            request.headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&suite_authorization(vector)).expect("ASCII"),
            );
            request.headers.insert(
                HeaderName::from_static(X_AMZ_DATE),
                HeaderValue::from_static("20150830T123600Z"),
            );
            verify_for_service(
                &request,
                vector.4.as_bytes(),
                &creds(),
                suite_now(),
                "service",
            )
            .unwrap_or_else(|e| panic!("{}: {}", vector.0, e.message()));
        }
    }

    #[test]
    fn suite_slashes_are_collapsed_like_botocore() {
        // get-slashes-normalized: `//example//` signs as `/example/`.
        assert_eq!(canonical_path("//example//"), "/example/");
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/a/b/.."), "/a");
        assert_eq!(canonical_path("/a/./b/"), "/a/b/");
    }

    #[test]
    fn already_encoded_paths_are_encoded_again() {
        // The suite's double-encode-path case (an API Gateway WebSocket connection id).
        assert_eq!(
            canonical_path("/test/@connections/JBDvjfGEIAMCERw%3D"),
            "/test/%40connections/JBDvjfGEIAMCERw%253D"
        );
        assert_eq!(
            canonical_path("/tags/arn%3Aaws%3Aapigateway%3Aus-east-1%3A%3A%2Fapikeys%2Fabc"),
            "/tags/arn%253Aaws%253Aapigateway%253Aus-east-1%253A%253A%252Fapikeys%252Fabc"
        );
        assert_eq!(
            canonical_path("/tags/arn:aws:apigateway:us-east-1::/apikeys/abc"),
            "/tags/arn%3Aaws%3Aapigateway%3Aus-east-1%3A%3A/apikeys/abc"
        );
    }

    #[test]
    fn query_is_decoded_reencoded_and_sorted() {
        assert_eq!(
            canonical_query(Some("nameQuery=a%20b&limit=2&flag&limit=1&x=%7e%2f+")),
            "flag=&limit=1&limit=2&nameQuery=a%20b&x=~%2F%2B"
        );
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
        assert_eq!(canonical_query(Some("bad=%zz%4")), "bad=%25zz%254");
    }

    // --- round trips through the public API ---------------------------------------------

    const NOW: u64 = 1_768_478_400; // 2026-01-15T12:00:00Z

    fn signed(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (Parts, SystemTime) {
        let mut request = parts(method, uri, headers);
        sign(&mut request, body, &creds(), "eu-west-1", at(NOW)).expect("signable");
        (request, at(NOW))
    }

    #[test]
    fn get_with_unsorted_repeated_and_encoded_query_round_trips() {
        let (request, now) = signed(
            "GET",
            "/apikeys?nameQuery=a%20b&limit=1&position=x%2By&limit=0&includeValues",
            &[("Host", "127.0.0.1:9180"), ("User-Agent", "gateway-cli")],
            b"",
        );
        let auth = auth_header(&request);
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260115/eu-west-1/apigateway/aws4_request, SignedHeaders=host;x-amz-date, Signature="
            ),
            "{auth}"
        );
        verify(&request, b"", &creds(), now).expect("accepted");
    }

    #[test]
    fn patch_with_json_body_round_trips_and_covers_the_body() {
        let body =
            br#"{"patchOperations":[{"op":"replace","path":"/throttle/rateLimit","value":"10"}]}"#;
        let (request, now) = signed(
            "PATCH",
            "/usageplans/abc",
            &[
                ("Host", "127.0.0.1:9180"),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        assert!(auth_header(&request).contains("SignedHeaders=content-type;host;x-amz-date,"));
        verify(&request, body, &creds(), now).expect("accepted");

        let tampered =
            br#"{"patchOperations":[{"op":"replace","path":"/throttle/rateLimit","value":"99"}]}"#;
        let err = verify(&request, tampered, &creds(), now).expect_err("body changed");
        assert_eq!(err.error_type(), "InvalidSignatureException");
    }

    #[test]
    fn encoded_path_round_trips() {
        for uri in [
            "/tags/arn%3Aaws%3Aapigateway%3Aus-east-1%3A%3A%2Fapikeys%2Fabc",
            "/tags/arn:aws:apigateway:us-east-1::/apikeys/abc",
        ] {
            let (request, now) = signed("GET", uri, &[("Host", "localhost")], b"");
            verify(&request, b"", &creds(), now).expect(uri);
        }
    }

    #[test]
    fn sign_adds_host_from_an_absolute_uri_without_the_default_port() {
        let (request, now) = signed("DELETE", "http://admin.example:80/apikeys/k1", &[], b"");
        assert_eq!(request.headers[HOST], "admin.example");
        verify(&request, b"", &creds(), now).expect("accepted");

        let (request, _) = signed("GET", "http://127.0.0.1:9180/apikeys", &[], b"");
        assert_eq!(request.headers[HOST], "127.0.0.1:9180");

        let mut request = parts("GET", "/apikeys", &[]);
        let err = sign(&mut request, b"", &creds(), "us-east-1", at(NOW)).expect_err("no host");
        assert!(matches!(err, SigV4Error::Unsignable { .. }));
    }

    #[test]
    fn sign_replaces_a_previous_signature_and_date() {
        let (mut request, _) = signed("GET", "/apikeys", &[("Host", "h")], b"");
        let later = at(NOW + 60);
        sign(&mut request, b"", &creds(), "eu-west-1", later).expect("re-signable");
        assert_eq!(request.headers.get_all(AUTHORIZATION).iter().count(), 1);
        assert_eq!(request.headers[X_AMZ_DATE], "20260115T120100Z");
        verify(&request, b"", &creds(), later).expect("accepted");
    }

    #[test]
    fn unsigned_headers_added_later_do_not_matter() {
        let (mut request, now) = signed("GET", "/apikeys", &[("Host", "h")], b"");
        request
            .headers
            .insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        request
            .headers
            .insert("user-agent", HeaderValue::from_static("aws-cli/2"));
        verify(&request, b"", &creds(), now).expect("accepted");
    }

    #[test]
    fn host_may_come_from_the_authority_as_in_http2() {
        let (request, now) = signed("GET", "/apikeys", &[("Host", "gw.example:9180")], b"");
        let mut h2 = parts("GET", "http://gw.example:9180/apikeys", &[]);
        for name in [AUTHORIZATION, HeaderName::from_static(X_AMZ_DATE)] {
            h2.headers
                .insert(name.clone(), request.headers[&name].clone());
        }
        verify(&h2, b"", &creds(), now).expect("accepted");
    }

    /// The `Authorization` a client computes over `names` (in that order) at `timestamp`.
    fn authorization_by_hand(request: &Parts, names: &[&str], timestamp: &str) -> String {
        let region = "eu-west-1";
        let headers: Vec<(&str, Vec<u8>)> = names
            .iter()
            .map(|&name| {
                (
                    name,
                    canonical_header_value(&request.headers, &request.uri, name),
                )
            })
            .collect();
        let signed = names.join(";");
        let creq = canonical_request(
            &request.method,
            &request.uri,
            &headers,
            &signed,
            &hex_sha256(b""),
        );
        let date = &timestamp[..8];
        let sts = string_to_sign(timestamp, date, region, SERVICE, &creq);
        let signature = hex::encode(
            signing_mac(SECRET, date, region, SERVICE, sts.as_bytes())
                .finalize()
                .into_bytes(),
        );
        format!(
            "AWS4-HMAC-SHA256 Credential={AKID}/{date}/{region}/{SERVICE}/aws4_request, SignedHeaders={signed}, Signature={signature}"
        )
    }

    #[test]
    fn date_header_in_http_form_is_accepted_without_x_amz_date() {
        // botocore keeps a caller's `Date` header (RFC 2822 form) and signs its instant.
        let date = "Thu, 15 Jan 2026 12:00:00 -0000";
        let request = parts("GET", "/apikeys", &[("Host", "h"), ("Date", date)]);
        let authorization = authorization_by_hand(&request, &["date", "host"], "20260115T120000Z");
        let mut request = with_authorization(&request, &authorization);
        verify(&request, b"", &creds(), at(NOW)).expect("accepted");

        for form in ["Thu, 15 Jan 2026 12:00:00 GMT", "20260115T120000Z"] {
            request.headers.insert(DATE, HeaderValue::from_static(form));
            let err = verify(&request, b"", &creds(), at(NOW)).expect_err("date text changed");
            // Same instant, other signed text: the signature no longer matches.
            assert!(
                matches!(err, SigV4Error::SignatureMismatch { .. }),
                "{form}: {err}"
            );
        }
        request.headers.insert(
            DATE,
            HeaderValue::from_static("Thu, 15 Jan 2026 12:06:00 GMT"),
        );
        let err = verify(&request, b"", &creds(), at(NOW)).expect_err("six minutes ahead");
        assert!(
            matches!(err, SigV4Error::SignatureNotYetCurrent { .. }),
            "{err}"
        );
    }

    #[test]
    fn signed_headers_are_taken_in_the_order_given() {
        let request = parts(
            "GET",
            "/apikeys",
            &[("Host", "h"), ("X-Amz-Date", "20260115T120000Z")],
        );
        let authorization =
            authorization_by_hand(&request, &["x-amz-date", "host"], "20260115T120000Z");
        let request = with_authorization(&request, &authorization);
        verify(&request, b"", &creds(), at(NOW)).expect("accepted");
    }

    #[test]
    fn http_dates_parse() {
        let want = parse_iso_basic("20260115T120000Z");
        assert!(want.is_some());
        assert_eq!(parse_http_date("Thu, 15 Jan 2026 12:00:00 GMT"), want);
        assert_eq!(parse_http_date("Thu, 15 Jan 2026 12:00:00 -0000"), want);
        assert_eq!(parse_http_date("Thu, 15 Jan 2026 12:00:00 +0000"), want);
        for bad in [
            "2026-01-15T12:00:00Z",
            "20260115T120000",
            "20261315T120000Z",
            "20260115t120000Z",
            "20260115T1200000",
            "+2026115T120000Z",
        ] {
            assert_eq!(parse_iso_basic(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials_debug_hides_the_secret() {
        let shown = format!("{:?}", creds());
        assert!(shown.contains(AKID));
        assert!(!shown.contains(SECRET));
        assert!(!shown.contains("EXAMPLEKEY"));
    }

    // --- every refusal, with AWS's type, status and text ---------------------------------

    fn refusal(request: &Parts, body: &[u8], now: SystemTime) -> SigV4Error {
        verify(request, body, &creds(), now).expect_err("refused")
    }

    fn with_authorization(request: &Parts, authorization: &str) -> Parts {
        let mut request = request.clone();
        request.headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(authorization).expect("ASCII"),
        );
        request
    }

    fn good() -> (Parts, SystemTime) {
        signed(
            "GET",
            "/apikeys?name=x",
            &[("Host", "h"), ("Content-Type", "application/json")],
            b"",
        )
    }

    #[test]
    fn missing_authorization_is_missing_authentication_token() {
        let request = parts("GET", "/apikeys", &[("Host", "h")]);
        let err = refusal(&request, b"", at(NOW));
        assert_eq!(err.error_type(), "MissingAuthenticationTokenException");
        assert_eq!(err.message(), "Missing Authentication Token");
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn malformed_headers_are_incomplete_signatures() {
        let (request, now) = good();

        let err = refusal(&with_authorization(&request, "Bearer abc"), b"", now);
        assert_eq!(err.error_type(), "IncompleteSignatureException");
        assert_eq!(
            err.message(),
            "'abc' not a valid key=value pair (missing equal-sign) in Authorization header: 'Bearer abc'."
        );
        assert_eq!(err.status(), 403);

        let mut no_date = with_authorization(&request, "eyJhbGciOi");
        no_date.headers.remove(X_AMZ_DATE);
        let err = refusal(&no_date, b"", now);
        assert_eq!(err.error_type(), "IncompleteSignatureException");
        assert_eq!(
            err.message(),
            "Authorization header requires 'Credential' parameter. Authorization header requires 'Signature' parameter. Authorization header requires 'SignedHeaders' parameter. Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header. Authorization=eyJhbGciOi"
        );

        let partial = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260115/eu-west-1/apigateway/aws4_request, Signature=00";
        let err = refusal(&with_authorization(&request, partial), b"", now);
        assert_eq!(
            err.message(),
            format!(
                "Authorization header requires 'SignedHeaders' parameter. Authorization={partial}"
            )
        );

        let spaced = auth_header(&request).replace("Credential=", "Credential= ");
        let err = refusal(&with_authorization(&request, &spaced), b"", now);
        assert!(
            err.message().starts_with("'AKIDEXAMPLE/20260115/eu-west-1/apigateway/aws4_request' not a valid key=value pair"),
            "{}",
            err.message()
        );

        let sha1 = auth_header(&request).replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1");
        let err = refusal(&with_authorization(&request, &sha1), b"", now);
        assert_eq!(err.error_type(), "IncompleteSignatureException");
        assert!(matches!(err, SigV4Error::UnsupportedAlgorithm { .. }));

        let short = auth_header(&request).replace("/eu-west-1/", "/");
        let err = refusal(&with_authorization(&request, &short), b"", now);
        assert_eq!(err.error_type(), "IncompleteSignatureException");
        assert_eq!(
            err.message(),
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got 'AKIDEXAMPLE/20260115/apigateway/aws4_request'"
        );

        let mut bad_date = request.clone();
        bad_date.headers.insert(
            HeaderName::from_static(X_AMZ_DATE),
            HeaderValue::from_static("2026-01-15T12:00:00Z"),
        );
        let err = refusal(&bad_date, b"", now);
        assert_eq!(err.error_type(), "IncompleteSignatureException");
        assert_eq!(
            err.message(),
            "Date must be in ISO-8601 'basic format'. Got '2026-01-15T12:00:00Z'. See http://en.wikipedia.org/wiki/ISO_8601"
        );
    }

    #[test]
    fn scope_problems_are_invalid_signatures() {
        let (request, now) = good();
        let cases = [
            (
                auth_header(&request).replace("/apigateway/", "/execute-api/"),
                "Credential should be scoped to correct service: 'apigateway'. ",
            ),
            (
                auth_header(&request).replace("/aws4_request", "/aws5_request"),
                "Credential should be scoped with a valid terminator: 'aws4_request', not 'aws5_request'. ",
            ),
            (
                auth_header(&request).replace("/eu-west-1/", "//"),
                "Credential should be scoped to a valid region, not ''. ",
            ),
            (
                auth_header(&request).replace("/20260115/", "/20260114/"),
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '20260114' != '20260115', from '20260115T120000Z'.",
            ),
            (
                auth_header(&request).replace(
                    "SignedHeaders=content-type;host;x-amz-date",
                    "SignedHeaders=content-type;x-amz-date",
                ),
                "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
            ),
        ];
        for (authorization, message) in cases {
            let err = refusal(&with_authorization(&request, &authorization), b"", now);
            assert_eq!(err.error_type(), "InvalidSignatureException", "{message}");
            assert_eq!(err.message(), message);
            assert_eq!(err.status(), 403);
        }
    }

    #[test]
    fn any_region_is_accepted() {
        let mut request = parts("GET", "/apikeys", &[("Host", "h")]);
        sign(&mut request, b"", &creds(), "local", at(NOW)).expect("signable");
        verify(&request, b"", &creds(), at(NOW)).expect("accepted");
    }

    #[test]
    fn unknown_access_key_is_unrecognized_client() {
        let (request, now) = good();
        let other = Credentials::new("AKIDOTHER", SECRET);
        let err = verify(&request, b"", &other, now).expect_err("other key");
        assert_eq!(err.error_type(), "UnrecognizedClientException");
        assert_eq!(
            err.message(),
            "The security token included in the request is invalid."
        );
        assert_eq!(err.status(), 403);
        assert!(
            matches!(err, SigV4Error::UnrecognizedClient { ref access_key_id } if access_key_id == AKID)
        );
    }

    #[test]
    fn wrong_secret_or_tampering_is_a_signature_mismatch() {
        let (request, now) = good();
        let mismatch = |err: SigV4Error| {
            assert_eq!(err.error_type(), "InvalidSignatureException");
            assert_eq!(err.status(), 403);
            let message = err.message();
            assert!(message.starts_with(
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.\n\nThe Canonical String for this request should have been\n'GET\n/apikeys\nname=x\ncontent-type:"
            ), "{message}");
            assert!(message.contains("\n\nThe String-to-Sign should have been\n'AWS4-HMAC-SHA256\n20260115T120000Z\n20260115/eu-west-1/apigateway/aws4_request\n"));
            assert!(!message.contains(SECRET));
        };

        let wrong_secret = Credentials::new(AKID, "not-the-secret");
        mismatch(verify(&request, b"", &wrong_secret, now).expect_err("wrong secret"));

        let flipped = {
            let auth = auth_header(&request).to_owned();
            let last = auth.chars().last().expect("non-empty");
            let swap = if last == '0' { '1' } else { '0' };
            format!("{}{swap}", &auth[..auth.len() - 1])
        };
        mismatch(refusal(&with_authorization(&request, &flipped), b"", now));
        let not_hex = auth_header(&request).replace("Signature=", "Signature=zz");
        mismatch(refusal(&with_authorization(&request, &not_hex), b"", now));

        mismatch(refusal(&request, b"{}", now));

        let mut header = request.clone();
        header
            .headers
            .insert("content-type", HeaderValue::from_static("text/plain"));
        mismatch(refusal(&header, b"", now));

        let mut query = request.clone();
        query.uri = Uri::from_static("/apikeys?name=y");
        let err = refusal(&query, b"", now);
        assert!(matches!(err, SigV4Error::SignatureMismatch { .. }));

        let mut method = request.clone();
        method.method = Method::DELETE;
        let err = refusal(&method, b"", now);
        assert!(matches!(err, SigV4Error::SignatureMismatch { .. }));
    }

    #[test]
    fn clock_skew_is_bounded_both_ways() {
        let (request, _) = good();
        let skew = MAX_CLOCK_SKEW.as_secs();
        verify(&request, b"", &creds(), at(NOW + skew)).expect("5 min late is fine");
        verify(&request, b"", &creds(), at(NOW - skew)).expect("5 min early is fine");
        verify(
            &request,
            b"",
            &creds(),
            at(NOW + skew) + Duration::from_millis(999),
        )
        .expect("sub-second past the bound still reads as the bound");

        let err = refusal(&request, b"", at(NOW + skew + 1));
        assert_eq!(err.error_type(), "InvalidSignatureException");
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.message(),
            "Signature expired: 20260115T120000Z is now earlier than 20260115T120001Z (20260115T120501Z - 5 min.)"
        );

        let err = refusal(&request, b"", at(NOW - skew - 1));
        assert_eq!(err.error_type(), "InvalidSignatureException");
        assert_eq!(
            err.message(),
            "Signature not yet current: 20260115T120000Z is still later than 20260115T115959Z (20260115T115459Z + 5 min.)"
        );
    }
}
