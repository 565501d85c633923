package sluice

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// TLSConfig names the PEM files of a TLS connection. The files are read by Dial.
type TLSConfig struct {
	// CAFile holds the CAs that signed the server's certificate ("": the system's CAs).
	CAFile string
	// CertFile and KeyFile are a client certificate chain and its unencrypted key, for
	// servers that require one (mTLS); set both or neither.
	CertFile string
	KeyFile  string
	// ServerName is the name the server's certificate must carry, and the call
	// authority, when it differs from the address's host (an IP address, a tunnel).
	ServerName string
}

// WithTLS connects over TLS instead of plaintext.
func WithTLS(c TLSConfig) Option { return func(o *options) { o.tls = &c } }

// dialOptions are the transport credentials (and authority) for c.
func (c TLSConfig) dialOptions() ([]grpc.DialOption, error) {
	config := &tls.Config{ServerName: c.ServerName, MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("TLS CA file: %w", err)
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA file %s holds no PEM certificate", c.CAFile)
		}
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, errors.New("TLS CertFile and KeyFile go together")
	}
	if c.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("TLS client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(config))}
	if c.ServerName != "" {
		opts = append(opts, grpc.WithAuthority(c.ServerName))
	}
	return opts, nil
}
