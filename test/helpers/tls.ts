import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { run } from "./exec.js";

export interface TlsFiles {
  /** The CA that signed the server certificate: what a client must trust. */
  caFile: string;
  /** A directory holding only `ca.crt`, the layout skopeo's --cert-dir expects. */
  certDir: string;
  certFile: string;
  keyFile: string;
}

/**
 * A throwaway CA and a server certificate it signs for IP 127.0.0.1 (EC P-256: fast to make).
 * A separate CA, rather than one self-signed leaf, is what private registries really use.
 */
export async function makeServerCert(dir: string): Promise<TlsFiles> {
  const caKey = join(dir, "ca.key");
  const caFile = join(dir, "ca.pem");
  const keyFile = join(dir, "server.key");
  const csr = join(dir, "server.csr");
  const certFile = join(dir, "server.pem");
  const ext = join(dir, "server.ext");
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await run(
    "openssl",
    ["req", "-x509", ...ec, "-keyout", caKey, "-out", caFile, "-days", "2"].concat(
      ["-subj", "/CN=kiln test CA", "-addext", "basicConstraints=critical,CA:TRUE"],
      ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ),
  );
  await run("openssl", ["req", "-new", ...ec, "-keyout", keyFile, "-out", csr, "-subj", "/CN=127.0.0.1"]);
  await writeFile(
    ext,
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
  );
  await run(
    "openssl",
    ["x509", "-req", "-in", csr, "-CA", caFile, "-CAkey", caKey, "-CAcreateserial"].concat([
      "-out",
      certFile,
      "-days",
      "2",
      "-extfile",
      ext,
    ]),
  );
  const certDir = join(dir, "certs.d");
  await mkdir(certDir);
  await writeFile(join(certDir, "ca.crt"), await readFile(caFile));
  return { caFile, certDir, certFile, keyFile };
}

export interface SigningCert {
  certFile: string;
  /** PEM private key (RSA 2048) for RS256. */
  keyPem: string;
  /** The certificate as base64 DER, as a JWT `x5c` entry wants it. */
  certB64: string;
}

/** A self-signed RSA certificate for a token server; the registry trusts it via rootcertbundle. */
export async function makeSigningCert(dir: string): Promise<SigningCert> {
  const keyFile = join(dir, "token.key");
  const certFile = join(dir, "token.pem");
  await run(
    "openssl",
    ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", keyFile].concat([
      "-out",
      certFile,
      "-days",
      "2",
      "-subj",
      "/CN=kiln test token issuer",
    ]),
  );
  const pem = await readFile(certFile, "utf8");
  const certB64 = pem.replace(/-----(BEGIN|END) CERTIFICATE-----/g, "").replace(/\s+/g, "");
  return { certFile, keyPem: await readFile(keyFile, "utf8"), certB64 };
}
