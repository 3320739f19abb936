//! Certificates for TLS tests, made with openssl: a throwaway CA and a server certificate for
//! 127.0.0.1, laid out as QEMU's `tls-creds-x509` wants them.

use std::path::{Path, PathBuf};

use crate::run;

/// A CA and a server certificate for 127.0.0.1, made with openssl; returns (server dir, client dir).
pub fn make_certs(dir: &Path) -> (PathBuf, PathBuf) {
    let (srv, cli) = (dir.join("tls-server"), dir.join("tls-client"));
    std::fs::create_dir_all(&srv).expect("mkdir");
    std::fs::create_dir_all(&cli).expect("mkdir");
    let p = |name: &str| dir.join(name).to_str().expect("utf8").to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    let (ca_key, ca_cert) = (p("ca-key.pem"), p("ca-cert.pem"));
    ca.extend_from_slice(&[
        "-keyout",
        &ca_key,
        "-out",
        &ca_cert,
        "-days",
        "2",
        "-subj",
        "/CN=Cairn test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run("openssl", &ca);
    let (key, csr, cert, ext) = (
        p("server-key.pem"),
        p("server.csr"),
        p("server-cert.pem"),
        p("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let mut req = vec!["req"];
    req.extend_from_slice(&ec);
    req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
    run("openssl", &req);
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    std::fs::copy(&cert, srv.join("server-cert.pem")).expect("copy");
    std::fs::copy(&key, srv.join("server-key.pem")).expect("copy");
    std::fs::copy(&ca_cert, cli.join("ca-cert.pem")).expect("copy");
    (srv, cli)
}
