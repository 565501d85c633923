package sluice_test

// The client against real Sluice servers, started by tests/clients/test_go.py:
//   SLUICE_ADDRESS           the example models (and a generation model, when served)
//   SLUICE_HOLDING_ADDRESS   its `simple` model holds every call (deadlines, cancellation)
//   SLUICE_DRAINING_ADDRESS  sheds inference with UNAVAILABLE + SLUICE_PUSHBACK_MS pushback
//   SLUICE_GENERATION_MODEL  a generation model's name ("" when none is served)
//   SLUICE_EXPECTED_TEXT     what SLUICE_GENERATION_PROMPT generates greedily (8 tokens)
//   SLUICE_TLS_ADDRESS       requires client certificates (mTLS); SLUICE_TLS_CA_FILE signed
//                            its certificate and the client ones, SLUICE_TLS_CLIENT_* and
//                            SLUICE_TLS_ADMIN_* (named in its admin.identities) are PEM
//                            certificate / key pairs

import (
	"context"
	"errors"
	"io"
	"math"
	"os"
	"reflect"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sluicev1 "github.com/sluice/sluice/clients/go/gen/sluice/v1"
	"github.com/sluice/sluice/clients/go/sluice"
)

func dial(t *testing.T, env string, opts ...sluice.Option) *sluice.Client {
	t.Helper()
	address := os.Getenv(env)
	if address == "" {
		t.Skipf("%s is not set (pytest tests/clients starts the servers)", env)
	}
	client, err := sluice.Dial(address, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func generationModel(t *testing.T) string {
	model := os.Getenv("SLUICE_GENERATION_MODEL")
	if model == "" {
		t.Skip("the server serves no generation model")
	}
	return model
}

func prompt() string {
	if p := os.Getenv("SLUICE_GENERATION_PROMPT"); p != "" {
		return p
	}
	return "Once upon a time"
}

// wantCode fails unless err is an *sluice.Error with the code.
func wantCode(t *testing.T, err error, code codes.Code) *sluice.Error {
	t.Helper()
	var serr *sluice.Error
	if !errors.As(err, &serr) {
		t.Fatalf("want a *sluice.Error with %s, got %v", code, err)
	}
	if serr.Code != code || status.Code(err) != code {
		t.Fatalf("want %s, got %v", code, err)
	}
	return serr
}

func simpleInputs() (map[string]sluice.Tensor, []int32, []int32) {
	a, b := make([]int32, 16), make([]int32, 16)
	for i := range a {
		a[i], b[i] = int32(i), 3
	}
	return map[string]sluice.Tensor{
		"INPUT0": {Shape: []int64{1, 16}, Data: a},
		"INPUT1": {Shape: []int64{1, 16}, Data: b},
	}, a, b
}

func TestHealth(t *testing.T) {
	c := dial(t, "SLUICE_ADDRESS")
	ctx := context.Background()
	for service, want := range map[string]string{"": "SERVING", "sluice.model.simple": "SERVING"} {
		if got, err := c.Health(ctx, service); err != nil || got != want {
			t.Errorf("Health(%q) = %q, %v; want %q", service, got, err, want)
		}
	}
	_, err := c.Health(ctx, "sluice.model.nope")
	wantCode(t, err, codes.NotFound)
	if live, err := c.Live(ctx); err != nil || !live {
		t.Errorf("Live() = %v, %v", live, err)
	}
	if ready, err := c.Ready(ctx); err != nil || !ready {
		t.Errorf("Ready() = %v, %v", ready, err)
	}
}

func TestInferSimple(t *testing.T) {
	c := dial(t, "SLUICE_ADDRESS")
	inputs, a, b := simpleInputs()
	res, err := c.Infer(context.Background(), "simple", inputs, &sluice.InferOptions{RequestID: "go-1"})
	if err != nil {
		t.Fatal(err)
	}
	if res.ID != "go-1" || res.Model != "simple" || res.Version != "1" {
		t.Errorf("id, model, version = %q, %q, %q", res.ID, res.Model, res.Version)
	}
	sum, diff := make([]int32, 16), make([]int32, 16)
	for i := range a {
		sum[i], diff[i] = a[i]+b[i], a[i]-b[i]
	}
	want := map[string]sluice.Tensor{
		"OUTPUT0": {Datatype: "INT32", Shape: []int64{1, 16}, Data: sum},
		"OUTPUT1": {Datatype: "INT32", Shape: []int64{1, 16}, Data: diff},
	}
	if !reflect.DeepEqual(res.Outputs, want) {
		t.Errorf("outputs = %v, want %v", res.Outputs, want)
	}
	res, err = c.Infer(context.Background(), "simple", inputs, &sluice.InferOptions{Outputs: []string{"OUTPUT1"}})
	if err != nil || len(res.Outputs) != 1 || !reflect.DeepEqual(res.Outputs["OUTPUT1"], want["OUTPUT1"]) {
		t.Errorf("only OUTPUT1: %v, %v", res, err)
	}
}

func TestInferMLP(t *testing.T) {
	c := dial(t, "SLUICE_ADDRESS")
	x := make([]float32, 2*64)
	for i := range x {
		x[i] = float32(math.Sin(float64(i)))
	}
	inputs := map[string]sluice.Tensor{"input": {Shape: []int64{2, 64}, Data: x}}
	res, err := c.Infer(context.Background(), "mlp", inputs, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := res.Outputs["probabilities"]
	if p.Datatype != "FP32" || !reflect.DeepEqual(p.Shape, []int64{2, 10}) {
		t.Fatalf("probabilities: %s %v", p.Datatype, p.Shape)
	}
	values := p.Data.([]float32)
	for row := 0; row < 2; row++ {
		var total float64
		for _, v := range values[row*10 : row*10+10] {
			total += float64(v)
		}
		if math.Abs(total-1) > 1e-4 {
			t.Errorf("row %d sums to %v", row, total)
		}
	}
}

func TestModelOperations(t *testing.T) {
	c := dial(t, "SLUICE_ADDRESS")
	ctx := context.Background()
	index, err := c.RepositoryIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range index {
		found = found || (m.Name == "simple" && m.Version == "1" && m.State == "READY")
	}
	if !found {
		t.Errorf("simple/1 is not READY in %v", index)
	}
	models, err := c.ListModels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range models {
		if m.Name == "simple" && (m.State != sluicev1.ModelState_MODEL_STATE_READY ||
			m.BreakerState != sluicev1.BreakerState_BREAKER_STATE_CLOSED || m.Backend == "") {
			t.Errorf("simple: %v", m)
		}
	}
	meta, err := c.ModelMetadata(ctx, "simple", "")
	if err != nil || len(meta.Inputs) != 2 || meta.Inputs[0].Name != "INPUT0" ||
		!reflect.DeepEqual(meta.Inputs[0].Shape, []int64{-1, 16}) {
		t.Errorf("ModelMetadata(simple) = %v, %v", meta, err)
	}
	if config, err := c.ModelConfig(ctx, "mlp", ""); err != nil || config.MaxBatchSize != 32 {
		t.Errorf("ModelConfig(mlp) = %v, %v", config, err)
	}
	if err := c.UnloadModel(ctx, "passthrough"); err != nil {
		t.Fatal(err)
	}
	if ready, err := c.ModelReady(ctx, "passthrough", ""); err != nil || ready {
		t.Errorf("after unload: ready %v, %v", ready, err)
	}
	if err := c.LoadModel(ctx, "passthrough"); err != nil {
		t.Fatal(err)
	}
	if ready, err := c.ModelReady(ctx, "passthrough", ""); err != nil || !ready {
		t.Errorf("after load: ready %v, %v", ready, err)
	}
	wantCode(t, c.LoadModel(ctx, "nope"), codes.NotFound)
}

func mtls(who string) sluice.TLSConfig {
	return sluice.TLSConfig{
		CAFile:     os.Getenv("SLUICE_TLS_CA_FILE"),
		CertFile:   os.Getenv("SLUICE_TLS_" + who + "_CERT_FILE"),
		KeyFile:    os.Getenv("SLUICE_TLS_" + who + "_KEY_FILE"),
		ServerName: "localhost",
	}
}

func TestMutualTLS(t *testing.T) {
	ctx := context.Background()
	c := dial(t, "SLUICE_TLS_ADDRESS", sluice.WithTLS(mtls("CLIENT")))
	if got, err := c.Health(ctx, ""); err != nil || got != "SERVING" {
		t.Fatalf("Health() = %q, %v", got, err)
	}
	inputs, _, _ := simpleInputs()
	if res, err := c.Infer(ctx, "simple", inputs, nil); err != nil || len(res.Outputs) != 2 {
		t.Errorf("Infer over mTLS: %v, %v", res, err)
	}
	// Changes need a certificate named in admin.identities.
	wantCode(t, c.LoadModel(ctx, "simple"), codes.PermissionDenied)
	admin := dial(t, "SLUICE_TLS_ADDRESS", sluice.WithTLS(mtls("ADMIN")))
	if err := admin.LoadModel(ctx, "simple"); err != nil {
		t.Errorf("LoadModel with the admin certificate: %v", err)
	}
}

func TestTLSRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	anonymous := dial(t, "SLUICE_TLS_ADDRESS", sluice.WithTLS(sluice.TLSConfig{CAFile: os.Getenv("SLUICE_TLS_CA_FILE")}))
	_, err := anonymous.Health(ctx, "")
	wantCode(t, err, codes.Unavailable)
	misnamed := mtls("CLIENT")
	misnamed.ServerName = "elsewhere.sluice.test"
	_, err = dial(t, "SLUICE_TLS_ADDRESS", sluice.WithTLS(misnamed)).Health(ctx, "")
	wantCode(t, err, codes.Unavailable)
	if _, err := sluice.Dial("127.0.0.1:1", sluice.WithTLS(sluice.TLSConfig{CAFile: "/nonexistent.pem"})); err == nil {
		t.Error("Dial with a missing CA file succeeded")
	}
}

func TestErrors(t *testing.T) {
	c := dial(t, "SLUICE_ADDRESS")
	inputs, _, _ := simpleInputs()
	_, err := c.Infer(context.Background(), "nope", inputs, nil)
	if serr := wantCode(t, err, codes.NotFound); serr.RequestID == "" {
		t.Error("no request id")
	}
	inputs["INPUT0"] = sluice.Tensor{Shape: []int64{1, 16}, Data: make([]float32, 16)}
	_, err = c.Infer(context.Background(), "simple", inputs, nil)
	wantCode(t, err, codes.InvalidArgument)
}

func TestDeadlines(t *testing.T) {
	inputs, _, _ := simpleInputs()
	c := dial(t, "SLUICE_HOLDING_ADDRESS")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := c.Infer(ctx, "simple", inputs, nil)
	wantCode(t, err, codes.DeadlineExceeded)

	impatient := dial(t, "SLUICE_HOLDING_ADDRESS", sluice.WithTimeout(100*time.Millisecond))
	_, err = impatient.Infer(context.Background(), "simple", inputs, nil)
	wantCode(t, err, codes.DeadlineExceeded)

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = c.Infer(ctx, "simple", inputs, nil)
	wantCode(t, err, codes.Canceled)
}

func TestUnavailableIsRetriedAfterPushback(t *testing.T) {
	pushback, err := strconv.Atoi(os.Getenv("SLUICE_PUSHBACK_MS"))
	c := dial(t, "SLUICE_DRAINING_ADDRESS")
	if err != nil {
		t.Fatal("SLUICE_PUSHBACK_MS:", err)
	}
	inputs, _, _ := simpleInputs()
	started := time.Now()
	_, err = c.Infer(context.Background(), "simple", inputs, nil)
	serr := wantCode(t, err, codes.Unavailable)
	if serr.RetryAfter != time.Duration(pushback)*time.Millisecond {
		t.Errorf("RetryAfter = %v, want %dms", serr.RetryAfter, pushback)
	}
	// Four attempts, three waits of the server's pushback in between.
	if elapsed := time.Since(started); elapsed < 3*time.Duration(pushback)*time.Millisecond {
		t.Errorf("gave up after %v: the pushback was not honoured", elapsed)
	}
}

func TestGenerateStreams(t *testing.T) {
	model := generationModel(t)
	c := dial(t, "SLUICE_ADDRESS")
	ctx := context.Background()
	params := &sluicev1.SamplingParameters{MaxNewTokens: 8}
	gen, err := c.Generate(ctx, model, prompt(), params)
	if err != nil {
		t.Fatal(err)
	}
	var chunks []*sluicev1.GenerateResponse
	for {
		chunk, err := gen.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, chunk)
	}
	if len(chunks) < 2 {
		t.Fatalf("%d chunks", len(chunks))
	}
	text, tokens := "", 0
	for _, chunk := range chunks {
		text += chunk.Text
		tokens += len(chunk.TokenIds)
	}
	last := chunks[len(chunks)-1]
	if last.FinishReason != sluicev1.FinishReason_FINISH_REASON_LENGTH &&
		last.FinishReason != sluicev1.FinishReason_FINISH_REASON_STOP {
		t.Errorf("finish reason %v", last.FinishReason)
	}
	if int(last.Usage.GetCompletionTokens()) != tokens {
		t.Errorf("usage %v for %d tokens", last.Usage, tokens)
	}
	whole, err := c.GenerateText(ctx, model, prompt(), params)
	if err != nil || whole.Text != text || len(whole.TokenIDs) != tokens {
		t.Errorf("GenerateText = %+v, %v; streamed %q", whole, err, text)
	}
	if want, ok := os.LookupEnv("SLUICE_EXPECTED_TEXT"); ok && text != want {
		t.Errorf("text %q, want %q", text, want)
	}
	count, maxContext, err := c.CountTokens(ctx, model, prompt())
	if err != nil || count != last.Usage.GetPromptTokens() || maxContext <= count {
		t.Errorf("CountTokens = %d, %d, %v", count, maxContext, err)
	}
}

func TestGenerateCancelAndDeadline(t *testing.T) {
	model := generationModel(t)
	c := dial(t, "SLUICE_ADDRESS")
	count, maxContext, err := c.CountTokens(context.Background(), model, prompt())
	if err != nil {
		t.Fatal(err)
	}
	long := &sluicev1.SamplingParameters{MaxNewTokens: maxContext - count}

	ctx, cancel := context.WithCancel(context.Background())
	gen, err := c.Generate(ctx, model, prompt(), long)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gen.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	for err == nil {
		_, err = gen.Recv()
	}
	wantCode(t, err, codes.Canceled)

	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = c.GenerateText(ctx, model, prompt(), long)
	wantCode(t, err, codes.DeadlineExceeded)

	_, err = c.GenerateText(context.Background(), "nope", prompt(), nil)
	wantCode(t, err, codes.NotFound)
}
