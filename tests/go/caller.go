// A Go caller of Tally, built in GOPATH mode from Debian's packages (no module proxy):
// grpc-go 1.33 (golang-google-grpc-dev) and protobuf-go (golang-github-golang-protobuf-1-5-dev),
// with stubs that protoc-gen-go and protoc-gen-go-grpc wrote into $GOPATH/src/tally/v1.
// It creates a type and an experience, ingests an event with the xproxy metadata keys,
// reads back the cost, and decodes the error details of a refused call. Prints one JSON line.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	tallyv1 "tally/v1"
)

func main() {
	target, typeName := os.Args[1], os.Args[2]
	// grpc-go 1.33: grpc.Dial and WithInsecure (grpc.NewClient and insecure.NewCredentials came later).
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	types := tallyv1.NewExperienceTypeServiceClient(conn)
	experiences := tallyv1.NewExperienceServiceClient(conn)
	ingest := tallyv1.NewIngestServiceClient(conn)

	_, err = types.CreateExperienceType(ctx, &tallyv1.CreateExperienceTypeRequest{
		ExperienceType: &tallyv1.ExperienceType{Name: typeName, Description: "Summarize one document, from Go"},
	})
	if err != nil {
		fail("CreateExperienceType", err)
	}
	created, err := experiences.CreateExperience(ctx, &tallyv1.CreateExperienceRequest{ExperienceName: typeName})
	if err != nil {
		fail("CreateExperience", err)
	}
	experienceID := created.GetExperience().GetExperienceId()

	callCtx := metadata.AppendToOutgoingContext(ctx,
		"xproxy-experience-id", experienceID,
		"xproxy-experience-name", typeName,
		"xproxy-user-id", "go-user")
	var header metadata.MD
	ingested, err := ingest.Ingest(callCtx, &tallyv1.IngestRequest{Event: &tallyv1.UsageEvent{
		Category:       "system.openai",
		Resource:       "gpt-4o",
		Units:          map[string]*tallyv1.UnitCounts{"text": {Input: 1000, Output: 100}},
		IdempotencyKey: "go-" + experienceID,
	}}, grpc.Header(&header))
	if err != nil {
		fail("Ingest", err)
	}
	got, err := experiences.GetExperience(ctx, &tallyv1.GetExperienceRequest{ExperienceId: experienceID})
	if err != nil {
		fail("GetExperience", err)
	}

	// A refused call: the status carries google.rpc details (ErrorInfo with the reason).
	_, err = types.GetExperienceType(ctx, &tallyv1.GetExperienceTypeRequest{Name: typeName + "_missing"})
	reason := ""
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			reason = info.GetReason()
		}
	}

	headerIDs := header.Get("xproxy-experience-id")
	result := ingested.GetXproxyResult()
	out, _ := json.Marshal(map[string]interface{}{
		"experience_id":        experienceID,
		"result_experience_id": result.GetExperienceId(),
		"header_experience_id": headerIDs,
		"user_id":              result.GetUserId(),
		"cost_total_nanos":     result.GetCostTotal().GetNanos(),
		"stats_cost_nanos":     got.GetExperience().GetStats().GetCostTotal().GetNanos(),
		"event_count":          got.GetExperience().GetStats().GetEventCount(),
		"missing_type_code":    status.Code(err).String(),
		"missing_type_reason":  reason,
	})
	fmt.Println(string(out))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "go caller: %s failed: %v\n", what, err)
	os.Exit(1)
}
