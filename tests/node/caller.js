// A Node.js caller of Tally, with stubs loaded at run time from protos/ by
// @grpc/proto-loader: creates a type and an experience, ingests an event with
// the xproxy metadata keys, and reads back the cost. Prints one JSON line.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const target = process.argv[2];
const typeName = process.argv[3];
const protos = path.resolve(__dirname, "../../protos");
const definition = protoLoader.loadSync(
  ["tally/v1/experience_type_service.proto", "tally/v1/experience_service.proto", "tally/v1/ingest_service.proto"],
  { includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true }
);
const tally = grpc.loadPackageDefinition(definition).tally.v1;
const credentials = grpc.credentials.createInsecure();
const types = new tally.ExperienceTypeService(target, credentials);
const experiences = new tally.ExperienceService(target, credentials);
const ingest = new tally.IngestService(target, credentials);

function call(client, method, request, metadata = new grpc.Metadata()) {
  const deadline = new Date(Date.now() + 10000);
  return new Promise((resolve, reject) => {
    let headers = null;
    const c = client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve({ response, headers })
    );
    c.on("metadata", (m) => { headers = m; });
  });
}

async function main() {
  await call(types, "CreateExperienceType", {
    experience_type: { name: typeName, description: "Summarize one document, from Node.js" },
  });
  const { response: created } = await call(experiences, "CreateExperience", { experience_name: typeName });
  const experienceId = created.experience.experience_id;

  const metadata = new grpc.Metadata();
  metadata.set("xproxy-experience-id", experienceId);
  metadata.set("xproxy-experience-name", typeName);
  metadata.set("xproxy-user-id", "node-user");
  const event = {
    category: "system.openai",
    resource: "gpt-4o",
    units: { text: { input: 1000, output: 100 } },
    idempotency_key: `node-${experienceId}`,
  };
  const { response: ingested, headers } = await call(ingest, "Ingest", { event }, metadata);
  const { response: got } = await call(experiences, "GetExperience", { experience_id: experienceId });
  console.log(JSON.stringify({
    experience_id: experienceId,
    result_experience_id: ingested.xproxy_result.experience_id,
    header_experience_id: headers ? headers.get("xproxy-experience-id")[0] : null,
    user_id: ingested.xproxy_result.user_id,
    cost_total: ingested.xproxy_result.cost_total,
    stats_cost_total: got.experience.stats.cost_total,
    event_count: got.experience.stats.event_count,
  }));
}

main().catch((error) => {
  console.error(`node caller failed: ${error.code} ${error.details || error.message}`);
  process.exit(1);
});
