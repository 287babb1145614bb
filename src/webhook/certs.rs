//! The webhook's serving certificate. Self-managed by default: a CA and a
//! serving certificate generated in-process (rcgen), kept in a Secret that every
//! replica shares, the CA bundle patched into the ValidatingWebhookConfiguration,
//! reissued well before expiry and swapped into the running TLS server without a
//! restart. The alternative is certificate files (cert-manager's Secret mounted
//! into the pod), reloaded when they change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

const DAY: i64 = 24 * 3600;
/// The CA lives five years and is replaced when less than one is left; the old
/// one stays in the bundle until it expires, so certificates it signed keep working.
pub const CA_VALIDITY: i64 = 5 * 365 * DAY;
pub const CA_RENEW_BEFORE: i64 = 365 * DAY;
/// Serving certificates live 90 days and are reissued with 30 left: a month of
/// failed renewals before anything breaks.
pub const SERVING_VALIDITY: i64 = 90 * DAY;
pub const SERVING_RENEW_BEFORE: i64 = 30 * DAY;
/// Issued a little in the past, for API servers whose clocks run behind.
const BACKDATE: i64 = 3600;

const CA_COMMON_NAME: &str = "toolwarden webhook CA";
const KEY_CA_CERT: &str = "ca.crt";
const KEY_CA_KEY: &str = "ca.key";
const KEY_PREVIOUS_CA: &str = "previous-ca.crt";
const KEY_TLS_CERT: &str = "tls.crt";
const KEY_TLS_KEY: &str = "tls.key";
/// Expiry and names are kept beside the PEM, so renewal needs no X.509 parser.
const ANNOTATION_CA_NOT_AFTER: &str = "toolwarden.dev/ca-not-after";
const ANNOTATION_PREVIOUS_CA_NOT_AFTER: &str = "toolwarden.dev/previous-ca-not-after";
const ANNOTATION_NOT_AFTER: &str = "toolwarden.dev/serving-not-after";
const ANNOTATION_DNS_NAMES: &str = "toolwarden.dev/serving-dns-names";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate or key PEM is unusable: {0}")]
    Pem(String),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("webhook configuration {0} not found")]
    NoWebhookConfiguration(String),
}

impl CertError {
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::Generate(_) => "GenerateFailed",
            CertError::Pem(_) => "BadPem",
            CertError::Read { .. } => "ReadFailed",
            CertError::Kube(_) => "KubeApi",
            CertError::NoWebhookConfiguration(_) => "NoWebhookConfiguration",
        }
    }
}

/// The certificate the TLS server presents; replaced while serving.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// Installs a certificate chain and key (PEM); new handshakes use it at once.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), CertError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CertError::Pem(e.to_string()))?;
        if chain.is_empty() {
            return Err(CertError::Pem("no certificate in the chain".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertError::Pem(e.to_string()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CertError::Pem(e.to_string()))?;
        let certified = CertifiedKey::new(chain, key);
        certified
            .keys_match()
            .map_err(|e| CertError::Pem(e.to_string()))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// TLS 1.2/1.3 with ring, HTTP/1.1, the certificate from `store`.
pub fn tls_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A certificate and its key, PEM, with the certificate's expiry (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
}

/// Everything the Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca: Issued,
    /// The CA this one replaced, trusted until it expires.
    pub previous_ca: Option<(String, i64)>,
    pub serving: Issued,
    pub dns_names: Vec<String>,
}

impl Material {
    /// The PEM bundle the API server must trust.
    pub fn ca_bundle(&self, now: i64) -> String {
        let mut bundle = self.ca.cert_pem.clone();
        if let Some((pem, not_after)) = &self.previous_ca
            && *not_after > now
        {
            bundle.push_str(pem);
        }
        bundle
    }

    pub fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let mut data = std::collections::BTreeMap::from([
            (
                KEY_CA_CERT.to_string(),
                ByteString(self.ca.cert_pem.clone().into_bytes()),
            ),
            (
                KEY_CA_KEY.to_string(),
                ByteString(self.ca.key_pem.clone().into_bytes()),
            ),
            (
                KEY_TLS_CERT.to_string(),
                ByteString(self.serving.cert_pem.clone().into_bytes()),
            ),
            (
                KEY_TLS_KEY.to_string(),
                ByteString(self.serving.key_pem.clone().into_bytes()),
            ),
        ]);
        let mut annotations = std::collections::BTreeMap::from([
            (
                ANNOTATION_CA_NOT_AFTER.to_string(),
                self.ca.not_after.to_string(),
            ),
            (
                ANNOTATION_NOT_AFTER.to_string(),
                self.serving.not_after.to_string(),
            ),
            (ANNOTATION_DNS_NAMES.to_string(), self.dns_names.join(",")),
        ]);
        if let Some((pem, not_after)) = &self.previous_ca {
            data.insert(KEY_PREVIOUS_CA.into(), ByteString(pem.clone().into_bytes()));
            annotations.insert(
                ANNOTATION_PREVIOUS_CA_NOT_AFTER.into(),
                not_after.to_string(),
            );
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                annotations: Some(annotations),
                labels: Some(
                    [(
                        "app.kubernetes.io/part-of".to_string(),
                        "toolwarden".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Secret::default()
        }
    }

    /// Reads a Secret written by [`Material::to_secret`]; `None` when anything is
    /// missing (it is then regenerated).
    pub fn from_secret(secret: &Secret) -> Option<Material> {
        let data = secret.data.as_ref()?;
        let annotations = secret.metadata.annotations.as_ref()?;
        let text = |key: &str| {
            data.get(key)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let number = |key: &str| annotations.get(key).and_then(|v| v.parse::<i64>().ok());
        let previous_ca = match (
            text(KEY_PREVIOUS_CA),
            number(ANNOTATION_PREVIOUS_CA_NOT_AFTER),
        ) {
            (Some(pem), Some(not_after)) => Some((pem, not_after)),
            _ => None,
        };
        Some(Material {
            ca: Issued {
                cert_pem: text(KEY_CA_CERT)?,
                key_pem: text(KEY_CA_KEY)?,
                not_after: number(ANNOTATION_CA_NOT_AFTER)?,
            },
            previous_ca,
            serving: Issued {
                cert_pem: text(KEY_TLS_CERT)?,
                key_pem: text(KEY_TLS_KEY)?,
                not_after: number(ANNOTATION_NOT_AFTER)?,
            },
            dns_names: annotations
                .get(ANNOTATION_DNS_NAMES)?
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

fn timestamp(unix: i64) -> Result<OffsetDateTime, CertError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| CertError::Pem(format!("time {unix}: {e}")))
}

fn ca_params(not_before: i64, not_after: i64) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = timestamp(not_before)?;
    params.not_after = timestamp(not_after)?;
    Ok(params)
}

/// A new CA, valid from `now`.
pub fn new_authority(now: i64) -> Result<Issued, CertError> {
    let key = KeyPair::generate()?;
    let not_after = now + CA_VALIDITY;
    let cert = ca_params(now - BACKDATE, not_after)?.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// A serving certificate for `dns_names`, signed by `ca`; its PEM is the chain
/// (leaf then CA).
pub fn issue_serving(ca: &Issued, dns_names: &[String], now: i64) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    // Only the name, key usages and key of the issuer go into a certificate it signs.
    let issuer = Issuer::new(ca_params(now, ca.not_after)?, ca_key);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        dns_names
            .first()
            .map(String::as_str)
            .unwrap_or("toolwarden-webhook"),
    );
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let not_after = (now + SERVING_VALIDITY).min(ca.not_after);
    params.not_before = timestamp(now - BACKDATE)?;
    params.not_after = timestamp(not_after)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: format!("{}{}", cert.pem(), ca.cert_pem),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// What the Secret needs at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Valid for a while yet.
    Keep,
    /// A new serving certificate from the same CA.
    Reissue,
    /// A new CA (the current one kept as `previous_ca`) and serving certificate.
    NewAuthority,
}

/// Pure renewal decision.
pub fn plan(existing: Option<&Material>, dns_names: &[String], now: i64) -> Renewal {
    let Some(material) = existing else {
        return Renewal::NewAuthority;
    };
    if material.ca.not_after - now < CA_RENEW_BEFORE {
        return Renewal::NewAuthority;
    }
    if material.serving.not_after - now < SERVING_RENEW_BEFORE || material.dns_names != dns_names {
        return Renewal::Reissue;
    }
    Renewal::Keep
}

/// Applies a renewal decision.
pub fn renew(
    existing: Option<&Material>,
    dns_names: &[String],
    now: i64,
) -> Result<Option<Material>, CertError> {
    let (ca, previous_ca) = match (plan(existing, dns_names, now), existing) {
        (Renewal::Keep, _) => return Ok(None),
        (Renewal::Reissue, Some(old)) => (old.ca.clone(), old.previous_ca.clone()),
        (_, old) => (
            new_authority(now)?,
            old.map(|o| (o.ca.cert_pem.clone(), o.ca.not_after))
                .filter(|(_, not_after)| *not_after > now),
        ),
    };
    let serving = issue_serving(&ca, dns_names, now)?;
    Ok(Some(Material {
        ca,
        previous_ca,
        serving,
        dns_names: dns_names.to_vec(),
    }))
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Where the self-managed certificate lives and whom it serves.
#[derive(Clone, Debug)]
pub struct SelfManaged {
    pub namespace: String,
    pub secret: String,
    pub webhook_configuration: String,
    pub dns_names: Vec<String>,
    pub check_every: Duration,
}

impl SelfManaged {
    /// Keeps the Secret valid, the store loaded and the CA bundle patched; runs
    /// forever. Until the first round succeeds the server reports not ready, and
    /// failed rounds are retried within seconds.
    pub async fn run(self, client: Client, store: Arc<CertStore>) {
        loop {
            let wait = match self.round(&client, &store).await {
                Ok(()) => self.check_every,
                Err(error) => {
                    tracing::warn!(%error, reason = error.reason(), "certificate round failed; retrying");
                    self.check_every.min(Duration::from_secs(5))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One check: the Secret (renewed when due), the store, the CA bundle.
    pub async fn round(&self, client: &Client, store: &CertStore) -> Result<(), CertError> {
        let material = self.ensure_secret(client).await?;
        store.set(&material.serving.cert_pem, &material.serving.key_pem)?;
        self.patch_ca_bundle(client, &material.ca_bundle(unix_now()))
            .await
    }

    /// Reads the Secret, renewing it when due. Replicas race through the API
    /// server's optimistic concurrency: a lost race re-reads the winner's Secret.
    async fn ensure_secret(&self, client: &Client) -> Result<Material, CertError> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let existing = secrets.get_opt(&self.secret).await?;
            let material = existing.as_ref().and_then(Material::from_secret);
            let now = unix_now();
            let Some(renewed) = renew(material.as_ref(), &self.dns_names, now)? else {
                return Ok(material.expect("kept material exists"));
            };
            let mut secret = renewed.to_secret(&self.secret, &self.namespace);
            let written = match existing {
                Some(old) => {
                    secret.metadata.resource_version = old.metadata.resource_version;
                    secrets
                        .replace(&self.secret, &PostParams::default(), &secret)
                        .await
                }
                None => secrets.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %self.secret, not_after = renewed.serving.not_after, "webhook certificate renewed");
                    return Ok(renewed);
                }
                Err(kube::Error::Api(status)) if status.code == 409 && attempts < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn patch_ca_bundle(&self, client: &Client, bundle: &str) -> Result<(), CertError> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let mut config = api
            .get_opt(&self.webhook_configuration)
            .await?
            .ok_or_else(|| CertError::NoWebhookConfiguration(self.webhook_configuration.clone()))?;
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            let wanted = Some(ByteString(bundle.as_bytes().to_vec()));
            if webhook.client_config.service.is_some() && webhook.client_config.ca_bundle != wanted
            {
                webhook.client_config.ca_bundle = wanted;
                changed = true;
            }
        }
        if changed {
            api.replace(&self.webhook_configuration, &PostParams::default(), &config)
                .await?;
            tracing::info!(configuration = %self.webhook_configuration, "CA bundle patched");
        }
        Ok(())
    }
}

/// Certificate files (cert-manager): loaded at start, reloaded when their content changes.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub check_every: Duration,
}

impl Files {
    /// Loads the files once; errors are returned so a broken mount fails at start.
    pub fn load(&self, store: &CertStore) -> Result<(String, String), CertError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert, key) = (read(&self.cert)?, read(&self.key)?);
        store.set(&cert, &key)?;
        Ok((cert, key))
    }

    /// Reloads on change forever (kubelet swaps a mounted Secret through a
    /// symlink, so contents are compared, not events).
    pub async fn watch(self, store: Arc<CertStore>, mut loaded: (String, String)) {
        loop {
            tokio::time::sleep(self.check_every).await;
            let read = std::fs::read_to_string(&self.cert)
                .and_then(|c| Ok((c, std::fs::read_to_string(&self.key)?)));
            match read {
                Ok(current) if current != loaded => match store.set(&current.0, &current.1) {
                    Ok(()) => {
                        tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                        loaded = current;
                    }
                    // A half-written pair (cert updated, key not yet): keep serving the old one.
                    Err(error) => {
                        tracing::warn!(%error, "new certificate files unusable; keeping the current one")
                    }
                },
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "reading certificate files failed; keeping the current one")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["toolwarden-webhook.toolwarden.svc".into()]
    }

    #[test]
    fn renewal_happens_well_before_expiry_and_keeps_the_old_ca_trusted() {
        let now = 1_800_000_000;
        let first = renew(None, &names(), now)
            .unwrap()
            .expect("a first certificate");
        assert_eq!(first.ca.not_after, now + CA_VALIDITY);
        assert_eq!(first.serving.not_after, now + SERVING_VALIDITY);
        assert_eq!(plan(Some(&first), &names(), now + 59 * DAY), Renewal::Keep);
        assert_eq!(
            plan(Some(&first), &names(), now + 61 * DAY),
            Renewal::Reissue
        );
        let other_names = vec!["elsewhere.svc".to_string()];
        assert_eq!(plan(Some(&first), &other_names, now), Renewal::Reissue);
        let reissued = renew(Some(&first), &names(), now + 61 * DAY)
            .unwrap()
            .unwrap();
        assert_eq!(reissued.ca, first.ca, "same CA: the bundle stays");
        assert_ne!(reissued.serving, first.serving);
        let late = first.ca.not_after - CA_RENEW_BEFORE + 1;
        assert_eq!(plan(Some(&first), &names(), late), Renewal::NewAuthority);
        let rotated = renew(Some(&first), &names(), late).unwrap().unwrap();
        assert_ne!(rotated.ca, first.ca);
        let bundle = rotated.ca_bundle(late);
        assert!(bundle.contains(&rotated.ca.cert_pem) && bundle.contains(&first.ca.cert_pem));
        assert!(
            !rotated
                .ca_bundle(first.ca.not_after + 1)
                .contains(&first.ca.cert_pem)
        );
        // The Secret round-trips exactly; a damaged one is regenerated.
        let secret = rotated.to_secret("tls", "toolwarden");
        assert_eq!(Material::from_secret(&secret), Some(rotated.clone()));
        let mut damaged = secret.clone();
        damaged.data.as_mut().unwrap().remove(KEY_TLS_KEY);
        assert_eq!(Material::from_secret(&damaged), None);
        let store = CertStore::default();
        store
            .set(&rotated.serving.cert_pem, &rotated.serving.key_pem)
            .unwrap();
        assert!(store.is_loaded());
        // A key that does not belong to the certificate is refused, the old pair kept.
        assert!(
            store
                .set(&rotated.serving.cert_pem, &first.serving.key_pem)
                .is_err()
        );
        assert!(store.set("not pem", &first.serving.key_pem).is_err());
    }
}
