module github.com/sluice/sluice/clients/go

go 1.23

require (
	google.golang.org/grpc v1.75.1
	google.golang.org/protobuf v1.36.10
)
