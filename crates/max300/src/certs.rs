//! `max300 certs`: a development certificate authority and the certificates the broker, the
//! cloud and each device present. Production certificates (e.g. from AWS IoT) are used the
//! same way, through the `--ca/--cert/--key` settings.
//!
//! Keys are written with mode 0600 and never printed or logged.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jiff::civil::Date;
use max300_protocol::{Clock, DeviceId, SystemClock};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The cloud's identity: its certificate's CN (and O), and a name no device may take.
pub const CLOUD_NAME: &str = "max300-cloud";

/// How long certificates are valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Days from today.
    pub days: u32,
    /// Or an explicit last day (in the past, for tests of expired certificates).
    pub not_after: Option<Date>,
}

impl Validity {
    fn apply(&self, params: &mut CertificateParams) -> anyhow::Result<()> {
        let today = SystemClock
            .now()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date();
        let end = match self.not_after {
            Some(d) => d,
            None => today.checked_add(jiff::Span::new().days(i64::from(self.days)))?,
        };
        let start = today
            .yesterday()?
            .min(end.checked_sub(jiff::Span::new().days(30))?);
        let (y, m, d) = ymd(start)?;
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = ymd(end)?;
        params.not_after = rcgen::date_time_ymd(y, m, d);
        Ok(())
    }
}

fn ymd(d: Date) -> anyhow::Result<(i32, u8, u8)> {
    Ok((
        i32::from(d.year()),
        u8::try_from(d.month())?,
        u8::try_from(d.day())?,
    ))
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// Creates the CA, the broker's server certificate (for `broker_hosts`: DNS names or IP
/// addresses) and the cloud's client certificate.
pub fn init(
    dir: &Path,
    validity: Validity,
    broker_hosts: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a CA (ca.pem): remove it first to make a new one",
            dir.display()
        );
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("MAX300 development CA", Some("MAX300"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity.apply(&mut ca)?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut written = vec![
        write(dir, "ca.pem", &ca_cert.pem(), false)?,
        write(dir, "ca.key", &ca_key.serialize_pem(), true)?,
    ];
    let issuer = Issuer::new(ca, ca_key);

    let mut broker = CertificateParams::default();
    broker.distinguished_name = name("max300-broker", Some("MAX300"));
    broker.subject_alt_names = broker_hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(
                h.as_str()
                    .try_into()
                    .with_context(|| format!("--broker-host {h:?}"))?,
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    broker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    written.extend(leaf(dir, "broker", broker, &issuer, validity)?);

    let mut cloud = CertificateParams::default();
    cloud.distinguished_name = name(CLOUD_NAME, Some(CLOUD_NAME));
    cloud.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    written.extend(leaf(dir, "cloud", cloud, &issuer, validity)?);
    Ok(written)
}

/// Issues a device's key and certificate, CN = O = its id, signed by the CA in `dir`.
pub fn device(id: &str, dir: &Path, validity: Validity) -> anyhow::Result<Vec<PathBuf>> {
    let id = DeviceId::parse(id).context("device id")?;
    if id.as_str() == CLOUD_NAME {
        bail!("{CLOUD_NAME} is the cloud's identity: a device cannot have it");
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "{}: run `max300 certs init {}` first",
                dir.join(f).display(),
                dir.display()
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?).context("ca.key")?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).context("ca.pem")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(id.as_str(), Some(id.as_str()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf(dir, id.as_str(), params, &issuer, validity)
}

fn leaf(
    dir: &Path,
    stem: &str,
    mut params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    validity: Validity,
) -> anyhow::Result<Vec<PathBuf>> {
    validity.apply(&mut params)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(vec![
        write(dir, &format!("{stem}.pem"), &cert.pem(), false)?,
        write(dir, &format!("{stem}.key"), &key.serialize_pem(), true)?,
    ])
}

fn write(dir: &Path, file: &str, text: &str, secret: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join(file);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .with_context(|| format!("{}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("{}", path.display()))?;
    Ok(path)
}

/// Writes `mosquitto.conf` and `mosquitto.acl` into `dir` (next to the certificates of
/// `certs init`): TLS on `port` with client certificates required, the certificate's CN as
/// the user name, and per-device topics.
pub fn mosquitto(dir: &Path, port: u16) -> anyhow::Result<Vec<PathBuf>> {
    for needed in ["ca.pem", "broker.pem", "broker.key"] {
        if !dir.join(needed).exists() {
            bail!(
                "{}: run `max300 certs init {}` first",
                dir.join(needed).display(),
                dir.display()
            );
        }
    }
    let abs = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let file = |f: &str| abs.join(f).display().to_string();
    let conf = format!(
        "# mosquitto for a MAX300 fleet: mutual TLS and per-device topics.\n\
         # Made by `max300 certs mosquitto`; run with `mosquitto -c {conf}`.\n\
         per_listener_settings false\n\
         listener {port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         # The cloud subscribes for the whole fleet: let its queue hold a boundary's reports.\n\
         max_queued_messages 100000\n\
         max_inflight_messages 100\n\
         persistence false\n\
         log_dest stderr\n\
         # Started as root, mosquitto drops to its own user and could not read 0600 keys.\n\
         user root\n",
        conf = file("mosquitto.conf"),
        ca = file("ca.pem"),
        cert = file("broker.pem"),
        key = file("broker.key"),
        acl = file("mosquitto.acl"),
    );
    let acl = format!(
        "# The cloud ({CLOUD_NAME}) does the cloud side for every device.\n\
         user {CLOUD_NAME}\n\
         topic read max300/+/ack\n\
         topic read max300/+/report\n\
         topic read max300/+/heartbeat\n\
         topic read max300/+/sync\n\
         topic write max300/+/schedule\n\
         topic write max300/+/control\n\
         topic write max300/+/receipt\n\
         \n\
         # A device (CN = its id) only its own topics.\n\
         pattern read max300/%u/schedule\n\
         pattern read max300/%u/control\n\
         pattern read max300/%u/receipt\n\
         pattern write max300/%u/ack\n\
         pattern write max300/%u/report\n\
         pattern write max300/%u/heartbeat\n\
         pattern write max300/%u/sync\n"
    );
    Ok(vec![
        write(dir, "mosquitto.conf", &conf, false)?,
        write(dir, "mosquitto.acl", &acl, false)?,
    ])
}
