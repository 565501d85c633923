// Quickstart: check health, infer on the example model and stream a generation.
//
//	go run ./examples/quickstart [address] [generation model]
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	sluicev1 "github.com/sluice/sluice/clients/go/gen/sluice/v1"
	"github.com/sluice/sluice/clients/go/sluice"
)

func main() {
	address, model := sluice.DefaultAddress, "tiny_llama"
	if len(os.Args) > 1 {
		address = os.Args[1]
	}
	if len(os.Args) > 2 {
		model = os.Args[2]
	}
	client, err := sluice.Dial(address, sluice.WithTimeout(10*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()

	health, err := client.Health(ctx, "")
	check(err)
	fmt.Println("health:", health)

	a, b := make([]int32, 16), make([]int32, 16)
	for i := range a {
		a[i], b[i] = int32(i), 1
	}
	res, err := client.Infer(ctx, "simple", map[string]sluice.Tensor{
		"INPUT0": {Shape: []int64{1, 16}, Data: a},
		"INPUT1": {Shape: []int64{1, 16}, Data: b},
	}, nil)
	check(err)
	fmt.Println("simple OUTPUT0:", res.Outputs["OUTPUT0"].Data)

	gen, err := client.Generate(ctx, model, "Once upon a time", &sluicev1.SamplingParameters{MaxNewTokens: 16})
	check(err)
	defer gen.Close()
	fmt.Print("generation: ")
	for {
		chunk, err := gen.Recv()
		if err == io.EOF {
			break
		}
		check(err)
		fmt.Print(chunk.Text)
		if chunk.Usage != nil {
			fmt.Printf("\n[%s, %d tokens]\n", chunk.FinishReason, chunk.Usage.CompletionTokens)
		}
	}
}

func check(err error) {
	var serr *sluice.Error
	if errors.As(err, &serr) {
		log.Fatalf("%s: %s (request id %s)", serr.Code, serr.Message, serr.RequestID)
	}
	if err != nil {
		log.Fatal(err)
	}
}
