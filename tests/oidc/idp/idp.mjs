// A real OpenID provider for lapse's tests (tests/oidc). NOT a production config:
// dev interactions accept any password, keys are generated at start, storage is in memory,
// and the `fetch` override below lifts oidc-provider's SSRF guard so that back-channel
// logout POSTs may reach lapse on 127.0.0.1 (../shared/SETUP-NOTES.md §6).
//
// Environment: IDP_PORT, RP1 and RP2 (lapse base URLs), SECRET (both clients' secret).
// rp1 gets back-channel logout; rp2 does not (it relies on revalidate_every).
import { Provider } from 'oidc-provider';

const PORT = Number(process.env.IDP_PORT);
const ISSUER = `http://127.0.0.1:${PORT}`;
const SECRET = process.env.SECRET;
const client = (id, base, backchannel) => ({
  client_id: id,
  client_secret: SECRET,
  redirect_uris: [`${base}/_lapse/oidc/callback`],
  post_logout_redirect_uris: [`${base}/_lapse/oidc/signed-out`],
  ...(backchannel ? { backchannel_logout_uri: `${base}/_lapse/oidc/backchannel-logout`,
                      backchannel_logout_session_required: true } : {}),
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
});
const GROUPS = { alice: ['finance', 'lapse-admins'], bob: ['staff'] };

const provider = new Provider(ISSUER, {
  clients: [client('rp1', process.env.RP1, true), client('rp2', process.env.RP2, false)],
  features: {
    devInteractions: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    revocation: { enabled: true }, // RFC 7009: lapse revokes an ended session's refresh token
  },
  cookies: { keys: ['lapse-test-only'] },
  conformIdTokenClaims: false, // put profile claims in the ID token (lapse reads username and groups from it)
  claims: { openid: ['sub'], profile: ['name', 'preferred_username', 'groups'] },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, name: `User ${id}`, preferred_username: id, groups: GROUPS[id] || [] }),
  }),
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token'),
  fetch: (url, options) => { delete options.dispatcher; return globalThis.fetch(url, options); },
});
provider.on('backchannel.success', (ctx, client) => console.log(`backchannel ok ${client.clientId}`));
provider.on('backchannel.error', (ctx, err, client) => console.log(`backchannel error ${client.clientId} ${err} ${err.cause || ''}`));
provider.on('server_error', (ctx, err) => console.log('server_error', err));
provider.listen(PORT, '127.0.0.1', () => console.log(`idp listening ${ISSUER}`));
