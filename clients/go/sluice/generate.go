package sluice

import (
	"context"
	"io"
	"strings"

	sluicev1 "github.com/sluice/sluice/clients/go/gen/sluice/v1"
)

// Generation is a streamed generation. Call Recv until it returns io.EOF; Close ends the
// call early (it cancels the generation on the server).
type Generation struct {
	stream sluicev1.GenerationService_GenerateClient
	cancel context.CancelFunc
}

// Generate starts a generation of prompt on model. params may be nil (the server's
// defaults: 16 new tokens, greedy). The stream ends at the context's deadline, or the
// client's default timeout when it has none.
func (c *Client) Generate(ctx context.Context, model, prompt string, params *sluicev1.SamplingParameters) (*Generation, error) {
	ctx, cancel := c.withDeadline(ctx)
	req := &sluicev1.GenerateRequest{ModelName: model, Prompt: prompt, Parameters: params}
	stream, err := c.GenerationService.Generate(ctx, req)
	if err != nil {
		cancel()
		return nil, fromError(err, nil)
	}
	return &Generation{stream: stream, cancel: cancel}, nil
}

// Recv returns the next chunk; the last one has FinishReason and Usage set. After the
// last chunk it returns io.EOF; a failed generation returns an *Error.
func (g *Generation) Recv() (*sluicev1.GenerateResponse, error) {
	chunk, err := g.stream.Recv()
	if err == io.EOF {
		g.cancel()
		return nil, io.EOF
	}
	if err != nil {
		g.cancel()
		return nil, fromError(err, g.stream.Trailer())
	}
	return chunk, nil
}

// Close cancels the generation if it is still running.
func (g *Generation) Close() { g.cancel() }

// GenerateResult is a whole generation: its chunks joined.
type GenerateResult struct {
	Text         string
	TokenIDs     []uint32
	FinishReason sluicev1.FinishReason
	Usage        *sluicev1.Usage
	Model        string
	Version      string
}

// GenerateText runs a generation to its end and joins its chunks.
func (c *Client) GenerateText(ctx context.Context, model, prompt string, params *sluicev1.SamplingParameters) (*GenerateResult, error) {
	gen, err := c.Generate(ctx, model, prompt, params)
	if err != nil {
		return nil, err
	}
	defer gen.Close()
	var text strings.Builder
	result := &GenerateResult{}
	for {
		chunk, err := gen.Recv()
		if err == io.EOF {
			result.Text = text.String()
			return result, nil
		}
		if err != nil {
			return nil, err
		}
		text.WriteString(chunk.Text)
		result.TokenIDs = append(result.TokenIDs, chunk.TokenIds...)
		result.Model, result.Version = chunk.ModelName, chunk.ModelVersion
		if chunk.FinishReason != sluicev1.FinishReason_FINISH_REASON_UNSPECIFIED {
			result.FinishReason, result.Usage = chunk.FinishReason, chunk.Usage
		}
	}
}

// CountTokens returns the tokens prompt takes on model and the model's context length.
func (c *Client) CountTokens(ctx context.Context, model, prompt string) (tokens, maxContext uint32, err error) {
	res, err := unary(c, ctx, c.GenerationService.CountTokens, &sluicev1.CountTokensRequest{ModelName: model, Prompt: prompt})
	return res.GetTokenCount(), res.GetMaxContext(), err
}
