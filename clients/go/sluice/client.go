// Package sluice is a client for Sluice model servers: Open Inference Protocol v2
// inference, streamed generation, health and model operations over gRPC.
//
// Every call has a deadline: the context's, or the client's default timeout when the
// context has none. Calls that end UNAVAILABLE are retried by gRPC inside that deadline,
// waiting for the server's grpc-retry-pushback-ms (grpc-go before 1.40 retries only with
// GRPC_GO_RETRY=on). Failed calls return an *Error.
package sluice

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/sluice/sluice/clients/go/gen/inference"
	sluicev1 "github.com/sluice/sluice/clients/go/gen/sluice/v1"
)

// DefaultAddress is where `sluice serve` listens by default.
const DefaultAddress = "127.0.0.1:8001"

// RetryPolicy says how gRPC retries calls that end UNAVAILABLE.
type RetryPolicy struct {
	MaxAttempts       int // attempts in all, the first included (gRPC clamps this to 5)
	InitialBackoff    time.Duration
	MaxBackoff        time.Duration
	BackoffMultiplier float64
}

// DefaultRetryPolicy retries three times with exponential backoff and jitter.
var DefaultRetryPolicy = RetryPolicy{
	MaxAttempts: 4, InitialBackoff: 100 * time.Millisecond, MaxBackoff: 2 * time.Second,
	BackoffMultiplier: 2,
}

// ServiceConfig is the gRPC service config (JSON) that retries Sluice's services.
func ServiceConfig(p RetryPolicy) string {
	seconds := func(d time.Duration) string { return fmt.Sprintf("%gs", d.Seconds()) }
	config := map[string]interface{}{
		"methodConfig": []interface{}{map[string]interface{}{
			"name": []interface{}{
				map[string]string{"service": "inference.GRPCInferenceService"},
				map[string]string{"service": "sluice.v1.ModelService"},
				map[string]string{"service": "sluice.v1.GenerationService"},
			},
			"retryPolicy": map[string]interface{}{
				"maxAttempts":          p.MaxAttempts,
				"initialBackoff":       seconds(p.InitialBackoff),
				"maxBackoff":           seconds(p.MaxBackoff),
				"backoffMultiplier":    p.BackoffMultiplier,
				"retryableStatusCodes": []string{"UNAVAILABLE"},
			},
		}},
		"retryThrottling": map[string]interface{}{"maxTokens": 100, "tokenRatio": 0.1},
	}
	out, _ := json.Marshal(config)
	return string(out)
}

type options struct {
	timeout time.Duration
	retry   RetryPolicy
	tls     *TLSConfig
	dial    []grpc.DialOption
}

// Option configures Dial.
type Option func(*options)

// WithTimeout sets the deadline of calls whose context has none (default 30 s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithRetryPolicy replaces DefaultRetryPolicy.
func WithRetryPolicy(p RetryPolicy) Option { return func(o *options) { o.retry = p } }

// WithDialOptions adds gRPC dial options (credentials, interceptors); without WithTLS or
// transport credentials here the connection is plaintext.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dial = append(o.dial, opts...) }
}

// Client calls one Sluice server. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	timeout time.Duration
	// The generated stubs, for calls the helpers do not wrap (GenerateStream sessions...).
	InferenceService  inference.GRPCInferenceServiceClient
	ModelService      sluicev1.ModelServiceClient
	GenerationService sluicev1.GenerationServiceClient
	HealthService     healthpb.HealthClient
}

// Dial connects to a server ("host:port"); the connection is made lazily.
func Dial(address string, opts ...Option) (*Client, error) {
	o := options{timeout: 30 * time.Second, retry: DefaultRetryPolicy}
	for _, opt := range opts {
		opt(&o)
	}
	const maxBytes = 256 << 20
	transport := []grpc.DialOption{grpc.WithInsecure()}
	if o.tls != nil {
		var err error
		if transport, err = o.tls.dialOptions(); err != nil {
			return nil, err
		}
	}
	dial := append(append(transport,
		grpc.WithDefaultServiceConfig(ServiceConfig(o.retry)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxBytes), grpc.MaxCallSendMsgSize(maxBytes)),
	), o.dial...)
	conn, err := grpc.Dial(address, dial...)
	if err != nil {
		return nil, err
	}
	return &Client{
		conn:              conn,
		timeout:           o.timeout,
		InferenceService:  inference.NewGRPCInferenceServiceClient(conn),
		ModelService:      sluicev1.NewModelServiceClient(conn),
		GenerationService: sluicev1.NewGenerationServiceClient(conn),
		HealthService:     healthpb.NewHealthClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// withDeadline gives ctx the client's default timeout when it has no deadline.
func (c *Client) withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.timeout)
}

// unary runs one call with the default deadline and maps its error to *Error.
func unary[Req, Res any](
	c *Client, ctx context.Context, method func(context.Context, Req, ...grpc.CallOption) (Res, error), req Req,
) (Res, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	var trailer metadata.MD
	res, err := method(ctx, req, grpc.Trailer(&trailer))
	return res, fromError(err, trailer)
}

// Health is grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" is the whole
// server; "sluice.model.<name>" one model).
func (c *Client) Health(ctx context.Context, service string) (string, error) {
	res, err := unary(c, ctx, c.HealthService.Check, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return "", err
	}
	return res.GetStatus().String(), nil
}

// Live reports whether the server process is up.
func (c *Client) Live(ctx context.Context) (bool, error) {
	res, err := unary(c, ctx, c.InferenceService.ServerLive, &inference.ServerLiveRequest{})
	return res.GetLive(), err
}

// Ready reports whether the server can serve inference (started, not draining).
func (c *Client) Ready(ctx context.Context) (bool, error) {
	res, err := unary(c, ctx, c.InferenceService.ServerReady, &inference.ServerReadyRequest{})
	return res.GetReady(), err
}

// ModelReady reports whether a model (version "" is the serving one) can serve now.
func (c *Client) ModelReady(ctx context.Context, name, version string) (bool, error) {
	res, err := unary(c, ctx, c.InferenceService.ModelReady, &inference.ModelReadyRequest{Name: name, Version: version})
	return res.GetReady(), err
}

// ModelMetadata returns a model's inputs, outputs and versions.
func (c *Client) ModelMetadata(ctx context.Context, name, version string) (*inference.ModelMetadataResponse, error) {
	return unary(c, ctx, c.InferenceService.ModelMetadata, &inference.ModelMetadataRequest{Name: name, Version: version})
}

// ModelConfig returns a model's Triton-style configuration.
func (c *Client) ModelConfig(ctx context.Context, name, version string) (*inference.ModelConfig, error) {
	res, err := unary(c, ctx, c.InferenceService.ModelConfig, &inference.ModelConfigRequest{Name: name, Version: version})
	return res.GetConfig(), err
}

// RepositoryIndex lists every model in the repository, one entry per version, with its state.
func (c *Client) RepositoryIndex(ctx context.Context) ([]*inference.RepositoryIndexResponse_ModelIndex, error) {
	res, err := unary(c, ctx, c.InferenceService.RepositoryIndex, &inference.RepositoryIndexRequest{})
	return res.GetModels(), err
}

// ListModels lists every model version with its backend, device and breaker state.
func (c *Client) ListModels(ctx context.Context) ([]*sluicev1.ModelVersionStatus, error) {
	res, err := unary(c, ctx, c.ModelService.ListModels, &sluicev1.ListModelsRequest{})
	return res.GetModels(), err
}

// LoadModel loads (or reloads) a model from the server's repository.
func (c *Client) LoadModel(ctx context.Context, name string) error {
	_, err := unary(c, ctx, c.InferenceService.RepositoryModelLoad, &inference.RepositoryModelLoadRequest{ModelName: name})
	return err
}

// UnloadModel unloads a model.
func (c *Client) UnloadModel(ctx context.Context, name string) error {
	_, err := unary(c, ctx, c.InferenceService.RepositoryModelUnload, &inference.RepositoryModelUnloadRequest{ModelName: name})
	return err
}

// InferOptions are Infer's optional settings.
type InferOptions struct {
	Version   string   // "" is the serving version
	Outputs   []string // nil returns every output
	RequestID string   // echoed back; names the call in the server's logs
}

// InferResult is one inference answer.
type InferResult struct {
	Model, Version, ID string
	Outputs            map[string]Tensor
}

// Infer runs one inference; inputs travel as raw contents.
func (c *Client) Infer(ctx context.Context, model string, inputs map[string]Tensor, opts *InferOptions) (*InferResult, error) {
	if opts == nil {
		opts = &InferOptions{}
	}
	req := &inference.ModelInferRequest{ModelName: model, ModelVersion: opts.Version, Id: opts.RequestID}
	for name, tensor := range inputs {
		datatype, err := tensor.datatype()
		if err != nil {
			return nil, err
		}
		raw, err := tensor.raw()
		if err != nil {
			return nil, err
		}
		req.Inputs = append(req.Inputs, &inference.ModelInferRequest_InferInputTensor{
			Name: name, Datatype: datatype, Shape: tensor.Shape,
		})
		req.RawInputContents = append(req.RawInputContents, raw)
	}
	for _, name := range opts.Outputs {
		req.Outputs = append(req.Outputs, &inference.ModelInferRequest_InferRequestedOutputTensor{Name: name})
	}
	res, err := unary(c, ctx, c.InferenceService.ModelInfer, req)
	if err != nil {
		return nil, err
	}
	if len(res.RawOutputContents) != len(res.Outputs) {
		return nil, fmt.Errorf("sluice: the response has no raw contents for every output")
	}
	result := &InferResult{Model: res.ModelName, Version: res.ModelVersion, ID: res.Id, Outputs: map[string]Tensor{}}
	for i, out := range res.Outputs {
		tensor, err := fromRaw(res.RawOutputContents[i], out.Datatype, out.Shape)
		if err != nil {
			return nil, err
		}
		result.Outputs[out.Name] = tensor
	}
	return result, nil
}
